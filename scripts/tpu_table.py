"""docs/tpu.md's table: every shipped config compiled for Cloud TPU slices by libtpu's compiler.

    python scripts/tpu_table.py [--slices=v3-8,v4-8] [--programs=cifar10,hires] [--out=docs]

Each (program, slice, precision) is one `diffusion_jax.aot.preflight`; results accumulate in
OUT/tpu.json (a finished entry is not compiled again, so an interrupted run resumes), and the
table between the markers of OUT/tpu.md is rewritten from it after every entry. Configs that
compile to the same programs (the four 256x256 ones) share a row.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from diffusion_jax import aot  # noqa: E402
from diffusion_jax import config_cli  # noqa: E402
from diffusion_jax import parallel  # noqa: E402

HIRES = ('configs/celebahq.py', 'configs/lsun_church.py', 'configs/lsun_bedroom.py',
         'configs/lsun_cat.py')
# Program groups: configs whose networks, batches, samplers and sharding are the same, with the
# overrides of a lever row (e.g. the 256x256 models under FSDP rules).
PROGRAMS = {
    'cifar10': (('configs/cifar10.py',), {}),
    'cifar10_score': (('configs/cifar10_score.py',), {}),
    'hires': (HIRES, {}),
    'hires_fsdp': (HIRES, {'param_sharding': parallel.FSDP_RULES}),
    'mnist': (('configs/mnist.py',), {}),
}
PRECISIONS = {'fp32': {}, 'bf16': {'dtype': 'bfloat16'}}
# What decides the compiled programs; the rest (dataset name, flips, step counts) does not.
PROGRAM_FIELDS = ('model', 'diffusion', 'optim', 'sampling')
TRAINING_FIELDS = ('batch_size', 'parallel', 'param_sharding', 'num_microbatches',
                   'clip_per_replica', 'nan_policy', 'label_dropout')
START, END = '<!-- tpu_table:start -->', '<!-- tpu_table:end -->'


def program_config(paths):
    """The first config of a group, after checking the others compile to the same programs."""
    configs = [config_cli.config_from_file(os.path.join(ROOT, p)) for p in paths]

    def key(c):
        return (json.dumps({f: c[f].to_dict() for f in PROGRAM_FIELDS}, sort_keys=True,
                           default=str),
                [c.training[f] for f in TRAINING_FIELDS], c.data.image_size, c.data.channels)
    different = [p for p, c in zip(paths, configs) if key(c) != key(configs[0])]
    if different:
        raise ValueError(f'{different} do not compile to the programs of {paths[0]}')
    return configs[0]


def run_entry(program, slice_name, precision):
    paths, training = PROGRAMS[program]
    config = program_config(paths)
    with config.unlocked():
        config.model.update(PRECISIONS[precision])
        config.training.update(training)
    start = time.perf_counter()
    try:
        report = aot.preflight(config, slice_name)
    except aot.DoesNotFit as e:  # The compiler refused it: a row that says so.
        report = {'does_not_fit': str(e), 'param_sharding': config.training.param_sharding}
    report['wall_seconds'] = time.perf_counter() - start
    return report


def _f(value, scale=1.0, digits=2):
    return '?' if value is None else f'{value / scale:.{digits}f}'


def _collectives(figures):
    items = sorted(figures['collectives'].items())
    return ', '.join(f"{k} ×{v['count']} {v['bytes'] / 1e6:.0f} MB" for k, v in items) or 'none'


def render(results):
    """Markdown rows, one per entry, in PROGRAMS x slices x precisions order."""
    lines = ['| program (configs) | slice: devices × HBM | precision, sharding | train: arguments'
             ' + temporaries = total GiB per device (fits) | TFLOP / step | HBM GB / step | '
             "compiler's estimate: ms / step (steps/s) | gradient collectives per step | "
             "sampling: GiB per device, ms / reverse step, images/s | compile s (train, sample) |",
             '|---|---|---|---|---|---|---|---|---|---|']
    order = {k: i for i, k in enumerate(PROGRAMS)}
    for key in sorted(results, key=lambda k: (order.get(k.split('|')[0], 99), k)):
        program, slice_name, precision = key.split('|')
        r = results[key]
        sharding = 'FSDP' if r['param_sharding'] else 'replicated'
        names = ', '.join(os.path.basename(p)[:-3] for p in PROGRAMS[program][0])
        if 'does_not_fit' in r:
            lines.append(f"| {program} ({names}) | {slice_name} | {precision}, {sharding} | "
                         f"**does not fit**: {r['does_not_fit'].split(', and a ')[0]} "
                         '| | | | | | |')
            continue
        t, s = r['train'], r['sample']
        sample = ('not compiled' if s is None else
                  f"{s['total_gib']:.2f}, {_f(s['optimal_seconds'], 1e-3)}, "
                  f"{_f(s['images_per_second'], 1, 1)}")
        lines.append(
            f"| {program} ({names}) | {slice_name}: {r['num_devices']} × "
            f"{r['hbm_per_device_gib']:g} GiB | {precision}, {sharding} | "
            f"{t['argument_gib']:.2f} + {t['temp_gib']:.2f} = {t['total_gib']:.2f} "
            f"({'yes' if t['fits'] else '**no**'}) | {_f(t['flops'], 1e12, 3)} | "
            f"{_f(t['bytes_accessed'], 1e9)} | {_f(t['optimal_seconds'], 1e-3)} "
            f"({_f(t['steps_per_second'], 1, 1)}) | {_collectives(t)} | {sample} | "
            f"{t['compile_seconds']:.0f}, {s['compile_seconds'] if s else 0:.0f} |")
    return '\n'.join(lines)


def write(out_dir, results):
    with open(os.path.join(out_dir, 'tpu.json'), 'w') as f:
        json.dump(results, f, indent=1, sort_keys=True)
    page = os.path.join(out_dir, 'tpu.md')
    text = open(page).read() if os.path.exists(page) else f'# TPU\n\n{START}\n{END}\n'
    if START not in text or END not in text:
        raise ValueError(f'{page} has no {START} ... {END} markers for the table')
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    with open(page, 'w') as f:
        f.write(f'{head}{START}\n{render(results)}\n{END}{tail}')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--slices', default=','.join(aot.DOCUMENTED_SLICES))
    parser.add_argument('--programs', default=','.join(PROGRAMS))
    parser.add_argument('--precisions', default=','.join(PRECISIONS))
    parser.add_argument('--out', default=os.path.join(ROOT, 'docs'))
    args = parser.parse_args()
    aot._prepare_tpu_compiler()
    path = os.path.join(args.out, 'tpu.json')
    results = json.load(open(path)) if os.path.exists(path) else {}
    for program in args.programs.split(','):
        for slice_name in args.slices.split(','):
            for precision in args.precisions.split(','):
                key = f'{program}|{slice_name}|{precision}'
                if key in results:
                    continue
                print(f'{key} ...', flush=True)
                results[key] = run_entry(program, slice_name, precision)
                print(f"{key}: {results[key]['wall_seconds']:.0f} s", flush=True)
                write(args.out, results)
    write(args.out, results)


if __name__ == '__main__':
    main()

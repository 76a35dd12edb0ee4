"""Ours vs PyTorch + diffusers, in one process, alternating A/B/A/B after warm-up.

    python -m benchmarks.run            # every case; writes docs/benchmarks.{json,md}
    python -m benchmarks.run --quick    # fewer rounds, no memory children, nothing written
    python -m benchmarks.run --cases=train_mnist_b32 --xla_flags=--xla_cpu_use_onednn=true

Needs the `parity` extra (torch, diffusers). It refuses to report when other processes keep the
machine busy (measured from /proc/stat before and during the run). Peak memory comes from one
child process per case and side, so the two frameworks' peaks do not mix.
"""

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: (kind, config, batch or images, reverse steps, rounds, calls per measurement[, precision])
# precision 'bfloat16': ours with the mixed-precision policy (model.dtype); the peer under
# torch.autocast(bfloat16) on CPUs with bfloat16 matmul units, else in float32
# (`workloads.peer_precision`). Both keep float32 parameters.
CASES = {
    'train_cifar10_b8': ('train', 'cifar10', 8, None, 5, 2),
    'train_cifar10_b32': ('train', 'cifar10', 32, None, 5, 1),
    'train_cifar10_b32_bf16': ('train', 'cifar10', 32, None, 3, 1, 'bfloat16'),
    'train_mnist_b32': ('train', 'mnist', 32, None, 5, 10),
    'sample_mnist_16x1000': ('sample', 'mnist', 16, 1000, 3, 1),
    'sample_cifar10_16x20': ('sample', 'cifar10', 16, 20, 3, 1),
    'sample_cifar10_16x20_bf16': ('sample', 'cifar10', 16, 20, 3, 1, 'bfloat16'),
}
# Seconds-long cases that check the harness itself (tests/test_benchmarks.py); never reported.
SMOKE_CASES = {
    'train_tiny_b16': ('train', 'tiny', 16, None, 2, 1),
    'sample_tiny_16x20': ('sample', 'tiny', 16, 20, 2, 1),
}
# The paper's TPU v3-8 workloads (21 steps/s at batch 128; 256 samples in 17 s), for --ours_only
# runs on a TPU VM (the compiler's view of them without one: docs/tpu.md); far too slow for
# these CPUs.
TPU_CASES = {
    'train_cifar10_b128': ('train', 'cifar10', 128, None, 5, 20),
    'sample_cifar10_256x1000': ('sample', 'cifar10', 256, 1000, 3, 1),
    'train_cifar10_b128_bf16': ('train', 'cifar10', 128, None, 5, 20, 'bfloat16'),
    'sample_cifar10_256x1000_bf16': ('sample', 'cifar10', 256, 1000, 3, 1, 'bfloat16'),
}
# GPU sampling at a batch a GPU user samples with (benchmarks/gpu_check.py); the train cases are
# TPU_CASES' batch-128 ones.
GPU_CASES = {
    'sample_cifar10_128x100': ('sample', 'cifar10', 128, 100, 3, 1),
    'sample_cifar10_128x100_bf16': ('sample', 'cifar10', 128, 100, 3, 1, 'bfloat16'),
}
CASES.update(SMOKE_CASES)
CASES.update(TPU_CASES)
CASES.update(GPU_CASES)
REPORTED = [c for c in CASES if c not in SMOKE_CASES and c not in TPU_CASES
            and c not in GPU_CASES]
BUSY_CORES = 0.3  # Other processes' average load above which results are not reported.
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'diffusers', 'numpy')


def configure_backends(xla_flags, with_torch=True):
    """On a CPU one single-threaded XLA device per core (as main.py runs); torch on every core.
    On a TPU or GPU the CPU settings have no effect."""
    from diffusion_jax import main as main_lib
    os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {xla_flags}'.strip()
    cores = main_lib.available_cores()
    main_lib.configure_cpu_backend(None, cores, fast_math=True)
    if with_torch:
        import torch
        torch.set_num_threads(cores)


def load_config(name):
    import importlib
    return importlib.import_module(f'configs.{name}').get_config()


def case_config(case):
    """The config of a case, its precision as the compute dtype."""
    config = load_config(CASES[case][1])
    config.model.dtype = CASES[case][6] if len(CASES[case]) > 6 else 'float32'
    return config


def make_workload(case, side, peer_compile='none'):
    from benchmarks import workloads
    kind, _, size, steps, *_ = CASES[case]
    config = case_config(case)
    args = (size,) if kind == 'train' else (size, steps)
    if side == 'ours':
        return (workloads.JaxTrain if kind == 'train' else workloads.JaxSample)(config, *args)
    return (workloads.TorchTrain if kind == 'train' else workloads.TorchSample)(
        config, *args, compile_backend=peer_compile)


def measure(case, rounds, monitor, sides, peer_compile='none'):
    """Alternating rounds of the sides; per side the throughput of every round."""
    calls = CASES[case][5]
    sides = {side: make_workload(case, side, peer_compile) for side in sides}
    first_call = {side: w.prepare() for side, w in sides.items()}
    rates = {side: [] for side in sides}
    usage = {side: dict(minor_faults=0, system_s=0.0, user_s=0.0, units=0) for side in sides}
    monitor.reset()
    for _ in range(rounds):
        for side, workload in sides.items():
            before = resource.getrusage(resource.RUSAGE_SELF)  # Every thread of the process.
            start = time.perf_counter()
            for _ in range(calls):
                workload.run()
            rates[side].append(workload.units * calls / (time.perf_counter() - start))
            after = resource.getrusage(resource.RUSAGE_SELF)
            usage[side]['minor_faults'] += after.ru_minflt - before.ru_minflt
            usage[side]['system_s'] += after.ru_stime - before.ru_stime
            usage[side]['user_s'] += after.ru_utime - before.ru_utime
            usage[side]['units'] += workload.units * calls
    return rates, first_call, monitor.other_cores(), usage


def peak_memory(case, side, xla_flags):
    """Peak RSS (MiB) of a child process that prepares and runs one side of a case."""
    result = subprocess.run(
        [sys.executable, '-m', 'benchmarks.run', f'--child={case}:{side}',
         f'--xla_flags={xla_flags}'], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])['peak_rss_mib']


def summarize(case, rates, first_call, other_cores, gflop_per_unit, ceiling, usage=None):
    kind = CASES[case][0]
    from benchmarks import workloads
    config = case_config(case)
    out = {'case': case, 'unit': 'images/s' if kind == 'train' else 'image-steps/s',
           'other_cores': round(other_cores, 3), 'precision': config.model.dtype,
           'peer_precision': workloads.peer_precision(config)}
    for side in rates:
        median = statistics.median(rates[side])
        out[side] = {'median': median, 'min': min(rates[side]), 'max': max(rates[side]),
                     'first_call_s': first_call[side], 'gflops': median * gflop_per_unit,
                     'fraction_of_matmul_ceiling': median * gflop_per_unit / ceiling}
        if usage:  # Per unit (image or image-step) over the timed rounds: the allocator's cost.
            u = usage[side]
            out[side].update(minor_faults_per_unit=u['minor_faults'] / u['units'],
                             system_ms_per_unit=1e3 * u['system_s'] / u['units'],
                             user_ms_per_unit=1e3 * u['user_s'] / u['units'])
    out['ratio'] = out['ours']['median'] / out['peer']['median'] if 'peer' in out else None
    return out


def markdown_table(results):
    lines = ['| case | unit | ours (median, range) | diffusers (median, range) | ours / diffusers '
             '| first call ours / diffusers (s) | peak RSS ours / diffusers (MiB) '
             '| FLOP/s vs matmul ceiling ours / diffusers |',
             '|---|---|---|---|---|---|---|---|']
    nan = {'median': float('nan'), 'min': float('nan'), 'max': float('nan'),
           'first_call_s': float('nan'), 'fraction_of_matmul_ceiling': float('nan')}
    for r in results['cases']:
        o, p, ratio = r['ours'], r.get('peer', nan), r['ratio'] or float('nan')
        memory = (f'{o["peak_rss_mib"]:.0f} / {p.get("peak_rss_mib", float("nan")):.0f}'
                  if 'peak_rss_mib' in o else 'n/a')
        name = r['case']
        if r.get('precision', 'float32') != r.get('peer_precision', 'float32'):
            name += f' (diffusers in {r["peer_precision"]}: no bf16 matmul on this CPU)'
        lines.append(
            f'| {name} | {r["unit"]} | {o["median"]:.1f} ({o["min"]:.1f}–{o["max"]:.1f}) '
            f'| {p["median"]:.1f} ({p["min"]:.1f}–{p["max"]:.1f}) | **{ratio:.2f}×** '
            f'| {o["first_call_s"]:.1f} / {p["first_call_s"]:.1f} | {memory} '
            f'| {o["fraction_of_matmul_ceiling"]:.2f} / {p["fraction_of_matmul_ceiling"]:.2f} |')
    return '\n'.join(lines)


def write_docs(results, table):
    docs = ROOT / 'docs'
    docs.mkdir(exist_ok=True)
    (docs / 'benchmarks.json').write_text(json.dumps(results, indent=2) + '\n')
    page = docs / 'benchmarks.md'
    start, end = '<!-- results:start -->', '<!-- results:end -->'
    text = page.read_text() if page.exists() else f'# Benchmarks\n\n{start}\n{end}\n'
    header = (f'Run {results["date"]} on {results["machine"]}; '
              f'{", ".join(f"{k} {v}" for k, v in results["versions"].items())}. '
              f'fp32 matmul ceiling {results["matmul_ceiling_gflops"]:.0f} GFLOP/s '
              f'(best of {results["matmul_gflops"]}). Other processes: '
              f'{results["other_cores_max"]:.2f} cores at most. XLA flags: '
              f'`{results["xla_flags"]}`.')
    if 'memory_measured' in results:
        header += f' Peak RSS re-measured {results["memory_measured"]} (same machine, same code).'
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    page.write_text(f'{before}{start}\n{header}\n\n{table}\n{end}{after}')


def measure_memory(results, xla_flags):
    for summary in results['cases']:
        for side in ('ours', 'peer'):
            if side in summary:
                summary[side]['peak_rss_mib'] = peak_memory(summary['case'], side, xla_flags)


def remeasure_memory(path, xla_flags):
    results = json.loads(path.read_text())
    measure_memory(results, xla_flags or '')
    results['memory_measured'] = datetime.datetime.now(datetime.timezone.utc).strftime(
        '%Y-%m-%d %H:%M UTC')
    table = markdown_table(results)
    print(table)
    if path.resolve() == (ROOT / 'docs' / 'benchmarks.json').resolve():
        write_docs(results, table)
    else:
        path.write_text(json.dumps(results, indent=2) + '\n')


def child_main(spec, xla_flags):
    case, side = spec.split(':')
    configure_backends(xla_flags)
    from benchmarks import machine
    workload = make_workload(case, side)
    workload.prepare()
    workload.run()
    print(json.dumps({'peak_rss_mib': machine.peak_rss_mib()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cases', default=','.join(REPORTED), help='comma-separated case names')
    parser.add_argument('--quick', action='store_true',
                        help='2 rounds, no memory children, nothing written to docs/')
    parser.add_argument('--force', action='store_true', help='report even on a busy machine')
    parser.add_argument('--xla_flags', default='', help='extra XLA_FLAGS for our side')
    parser.add_argument('--ours_only', action='store_true',
                        help='no peer (e.g. on a TPU VM without torch); nothing written to docs/')
    parser.add_argument('--json', help='also write the results here')
    parser.add_argument('--peer_compile', default='none',
                        help='the peer under torch.compile: none | inductor | eager (graph '
                        'capture only); anything but none writes nothing to docs/')
    parser.add_argument('--memory_of', help='re-measure only the peak RSS of the cases in this '
                        'results JSON (rewriting docs/ if it is docs/benchmarks.json)')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args.child, args.xla_flags)
    if args.memory_of:
        return remeasure_memory(pathlib.Path(args.memory_of), args.xla_flags)
    cases = args.cases.split(',')
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        sys.exit(f'unknown case(s) {unknown}; known: {sorted(CASES)}')
    from benchmarks import machine
    idle = machine.idle_load()
    if idle > BUSY_CORES and not args.force:
        sys.exit(f'refusing to benchmark: other processes use {idle:.2f} cores '
                 f'(limit {BUSY_CORES}); rerun on an idle machine or pass --force')
    configure_backends(args.xla_flags, with_torch=not args.ours_only)
    import jax
    from benchmarks import workloads
    sides = ('ours',) if args.ours_only else ('ours', 'peer')
    ceilings = machine.matmul_ceilings(with_torch=not args.ours_only)
    ceiling = max(ceilings.values())
    print(f'fp32 matmul GFLOP/s: {ceilings}; other load before the run {idle:.2f} cores',
          flush=True)
    monitor = machine.LoadMonitor()
    results = {
        'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
        'machine': machine.cpu_description(), 'python': platform.python_version(),
        'versions': {p: importlib.metadata.version(p) for p in PACKAGES},
        'xla_flags': os.environ.get('XLA_FLAGS', ''), 'matmul_gflops': ceilings,
        'matmul_ceiling_gflops': ceiling, 'other_cores_before': idle, 'cases': []}
    for case in cases:
        kind, config_name = CASES[case][:2]
        gflop = workloads.forward_gflops(load_config(config_name)) * (3 if kind == 'train' else 1)
        rounds = 2 if args.quick else CASES[case][4]
        rates, first_call, other, usage = measure(case, rounds, monitor, sides,
                                                  args.peer_compile)
        summary = summarize(case, rates, first_call, other, gflop, ceiling, usage)
        summary.update(gflop_per_unit=gflop, peer_compile=args.peer_compile,
                       peer_device=None if args.ours_only else workloads.peer_device(),
                       our_devices=str(jax.devices()))
        results['cases'].append(summary)
        print(json.dumps(summary), flush=True)
        gc.collect()
    if not args.quick and (args.ours_only or workloads.peer_device() == 'cpu'):
        measure_memory(results, args.xla_flags)  # Host RSS: meaningful where both run there.
    results['other_cores_max'] = max(r['other_cores'] for r in results['cases'])
    table = markdown_table(results)
    print(table)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2) + '\n')
    if results['other_cores_max'] > BUSY_CORES and not args.force:
        sys.exit(f'not reporting: other processes used up to {results["other_cores_max"]:.2f} '
                 'cores during the run')
    if (not args.quick and not args.ours_only and args.peer_compile == 'none'
            and set(cases) == set(REPORTED)):
        write_docs(results, table)


if __name__ == '__main__':
    from diffusion_jax import allocator
    allocator.reexec_with_allocator()  # As the CLI runs; DIFFUSION_JAX_ALLOCATOR=default: without.
    main()

"""Main-job study: what each change to configs/mnist.py buys within the 20-minute budget.

    python scripts/main_job_study.py --workdir=runs/main_job_study --docs_dir=docs

Every variant is the README's main command (`python -m diffusion_jax.main
--config=configs/mnist.py`) with a few `--config.*` overrides, run as its own process exactly as a
user would run it, one after the other on the same machine. For each: the wall time split into
start-up and compile / training / sampling (from the run's own log lines and metrics.jsonl),
steps/s, then FD-MNIST5k, classifier IS and the class histogram of its samples.npz and, with
--bpd_images, the test bits/dim of `--mode=eval`. The floor is the same metrics of real
training digits, as many as there are samples.

A proxy budget ranks many variants at once: --train_fraction scales every variant's step count
(time-budget variants keep their ratio to the baseline) and --sampler_steps > 0 samples with
DDIM at η = 1 (ancestral-like, on a strided schedule) instead of the 1000 ancestral steps; the
report says which budget it was. Sampling-only variants (fixedsmall) always take the 1000
ancestral steps: DDIM's σ ignores the variance choice (η = 1 is fixedsmall's β̃). Writes
main_job_study.{json,md} to the workdir (the JSON after every variant, so an interrupted study
keeps what it measured) and to --docs_dir.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

from absl import app
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE_CONFIG = 'configs/mnist.py'
# name -> overrides of configs/mnist.py, as the command line spells them. A variant that changes
# only sampling names the variant whose checkpoints it reuses in SAMPLE_ONLY.
VARIANTS = {
    'baseline': {},
    'lr_2e-3': {'optim.learning_rate': '2e-3'},
    'lr_5e-4': {'optim.learning_rate': '5e-4'},
    'ema_0.9995': {'optim.ema_decay': '0.9995'},
    'ema_0.998': {'optim.ema_decay': '0.998'},
    'batch_64_half_steps': {'training.batch_size': '64', 'training.num_train_steps': '1200'},
    'batch_16_double_steps': {'training.batch_size': '16', 'training.num_train_steps': '4800'},
    # Not a candidate (twice the training time): how far more compute alone would go.
    'double_steps': {'training.num_train_steps': '4800'},
    # What the network predicts (the paper's main job predicts ε): x_0 alone, and Benny & Wolf's
    # dual output (ε, x_0 and their per-pixel mix); both beat ε under DDIM in the few-step study.
    'x0_prediction': {'diffusion.mean_type': 'x0'},
    'dual_output': {'diffusion.mean_type': 'dual', 'model.out_ch': '3'},
    'ch_24_fewer_steps': {'model.ch': '24', 'training.num_train_steps': '1600'},
    'ch_32_fewer_steps': {'model.ch': '32', 'training.num_train_steps': '1100'},
    'no_attention': {'model.attn_resolutions': '()'},
    # Width where the digit's shape is decided: 64 channels at 7x7 instead of 32. (1, 1, 4) costs
    # about what (1, 2, 2) does per step; (1, 2, 4) is ~1.35x slower per training step.
    'ch_mult_114': {'model.ch_mult': '(1,1,4)'},
    # 'num_train_steps': the decay ends where the run ends, whatever the base config's steps.
    'cosine_lr': {'optim.lr_decay_steps': 'num_train_steps'},
    'ch_mult_114_cosine_lr': {'model.ch_mult': '(1,1,4)',
                              'optim.lr_decay_steps': 'num_train_steps'},
    'ch_mult_114_no_attention': {'model.ch_mult': '(1,1,4)', 'model.attn_resolutions': '()'},
    'ch_mult_124_fewer_steps': {'model.ch_mult': '(1,2,4)', 'training.num_train_steps': '1500'},
    'dropout_0.1': {'model.dropout': '0.1'},
    'fixedsmall': {'diffusion.var_type': 'fixedsmall'},
    'shard_map': {'training.parallel': 'shard_map'},
}
SAMPLE_ONLY = {'fixedsmall': 'baseline'}

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string('workdir', 'runs/main_job_study', 'One sub-directory per variant.')
    flags.DEFINE_list('variants', list(VARIANTS), f'Variants, from {list(VARIANTS)}.')
    flags.DEFINE_float('train_fraction', 1.0, 'Scale every variant\'s training steps (a proxy).')
    flags.DEFINE_integer('sampler_steps', 0, 'DDIM (eta = 1) steps; 0: the 1000 ancestral steps.')
    flags.DEFINE_integer('bpd_images', 0, 'Test images in each variant\'s bits/dim (0: skip).')
    flags.DEFINE_list('extra', [], 'More key=value overrides of every variant (data.data_dir=...).')
    flags.DEFINE_string('docs_dir', None, 'Also copy the report here.')


def parse_extra(pairs):
    """{key: value} of the --extra key=value pairs."""
    return dict(kv.split('=', 1) for kv in pairs)


def variant_overrides(name, base_steps, *, train_fraction=1.0, sampler_steps=0, extra=None):
    """The variant's overrides with the proxy budget applied: {config key: command-line value}."""
    overrides = dict(VARIANTS[name])
    steps = int(overrides.get('training.num_train_steps', base_steps))
    overrides['training.num_train_steps'] = str(max(1, round(steps * train_fraction)))
    if 'optim.lr_decay_steps' in overrides:  # The decay ends where the scaled run does.
        decay = overrides['optim.lr_decay_steps']
        decay = steps if decay == 'num_train_steps' else int(decay)
        overrides['optim.lr_decay_steps'] = str(max(1, round(decay * train_fraction)))
    if sampler_steps and name not in SAMPLE_ONLY:
        overrides.update({'sampling.sampler': 'ddim', 'sampling.eta': '1.0',
                          'sampling.num_steps': str(sampler_steps),
                          'sampling.timestep_spacing': 'trailing'})
    overrides.update(extra or {})
    return overrides


def run_main(workdir, overrides, mode='train'):
    """Runs the main command; (wall seconds, its log) or RuntimeError with the log's tail."""
    cmd = [sys.executable, '-m', 'diffusion_jax.main', f'--config={BASE_CONFIG}',
           f'--workdir={workdir}', f'--mode={mode}'] + [
               f'--config.{k}={v}' for k, v in overrides.items()]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    with open(os.path.join(workdir, f'{mode}.log'), 'w') as f:
        f.write(' '.join(cmd) + '\n' + log)
    if proc.returncode:
        raise RuntimeError(f'{" ".join(cmd)} failed ({proc.returncode}):\n{log[-3000:]}')
    return seconds, log


def _logged_seconds(pattern, log):
    match = re.search(pattern, log)
    return float(match.group(1)) if match else None


def training_seconds(workdir):
    """(seconds in the training loop, steps): each logged interval's steps over its steps/s,
    from step 0 (a study's runs start fresh)."""
    total, last_step = 0.0, 0
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        for line in f:
            row = json.loads(line)
            if 'steps_per_sec' not in row:
                continue
            total += (row['step'] - last_step) / row['steps_per_sec']
            last_step = row['step']
    return total, last_step


def study_variant(name, base_steps):
    import numpy as np
    from diffusion_jax.evaluation import feature_metrics
    vdir = os.path.join(FLAGS.workdir, name)
    os.makedirs(vdir, exist_ok=True)
    overrides = variant_overrides(name, base_steps, train_fraction=FLAGS.train_fraction,
                                  sampler_steps=FLAGS.sampler_steps,
                                  extra=parse_extra(FLAGS.extra))
    if name in SAMPLE_ONLY:  # Same training: reuse the checkpoints, time only the sampling.
        source = os.path.join(FLAGS.workdir, SAMPLE_ONLY[name])
        for item in ('checkpoints', 'metrics.jsonl', 'config.json'):
            src, dst = os.path.join(source, item), os.path.join(vdir, item)
            if os.path.isdir(src) and not os.path.exists(dst):
                shutil.copytree(src, dst)
            elif os.path.isfile(src):
                shutil.copy(src, dst)
    wall, log = run_main(vdir, overrides)
    train_seconds, steps = training_seconds(vdir)
    row = dict(variant=name, overrides=VARIANTS[name], wall_seconds=wall, train_steps=steps,
               compile_seconds=_logged_seconds(r'Compiled the train step in ([\d.]+) s', log),
               sample_seconds=_logged_seconds(r'Sampled \d+ images in ([\d.]+) s', log))
    if name in SAMPLE_ONLY:
        row.update(train_seconds=None, reuses=SAMPLE_ONLY[name])
    else:
        row.update(train_seconds=train_seconds, steps_per_sec=steps / max(train_seconds, 1e-9))
    with np.load(os.path.join(vdir, 'samples.npz')) as f:
        row.update(feature_metrics.mnist5k_metrics(f['images']))
    if FLAGS.bpd_images:
        overrides['eval.num_images'] = str(FLAGS.bpd_images)
        row['eval_seconds'], _ = run_main(vdir, overrides, mode='eval')
        with open(os.path.join(vdir, 'eval.json')) as f:
            evaluation = json.load(f)
        row.update(bits_per_dim=evaluation['bits_per_dim'],
                   bits_per_dim_stderr=evaluation['bits_per_dim_stderr'])
    return row


def _cell(value, fmt):
    return 'n/a' if value is None else format(value, fmt)


def write_report(results, out_dir):
    """main_job_study.json and .md (the ablation table) in out_dir."""
    with open(os.path.join(out_dir, 'main_job_study.json'), 'w') as f:
        json.dump(results, f, indent=2)
    floor = results['real_digits']
    lines = [f'`{results["command"]}`', '', f'Budget: {results["budget"]}.', '',
             '| variant | overrides | wall min | compile s | train s | steps | steps/s | '
             'sample s | FD-MNIST5k | classifier IS | fewest per class | bits/dim |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in results['rows']:
        overrides = ', '.join(f'{k}={v}' for k, v in r['overrides'].items()) or '(none)'
        if r.get('reuses'):
            overrides += f' (sampling only; weights of {r["reuses"]})'
        lines.append(
            f'| {r["variant"]} | {overrides} | {r["wall_seconds"] / 60:.1f} | '
            f'{_cell(r["compile_seconds"], ".1f")} | {_cell(r["train_seconds"], ".0f")} | '
            f'{r["train_steps"]} | {_cell(r.get("steps_per_sec"), ".2f")} | '
            f'{_cell(r["sample_seconds"], ".0f")} | {r["fd_mnist5k"]:.1f} | '
            f'{r["classifier_is"]:.2f} | {min(r["class_counts"])} | '
            f'{_cell(r.get("bits_per_dim"), ".3f")} |')
    lines += ['', f'Real training digits, {floor["num_samples"]} at a time ({floor["subsets"]} '
              f'disjoint sets): FD-MNIST5k {floor["fd_mnist5k"]:.1f} ± '
              f'{floor["fd_mnist5k_std"]:.1f}, classifier IS {floor["classifier_is"]:.2f} ± '
              f'{floor["classifier_is_std"]:.2f}.']
    with open(os.path.join(out_dir, 'main_job_study.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')


def main(argv):
    del argv
    from configs import mnist
    from diffusion_jax.data import pipeline as data_pipeline
    from diffusion_jax.evaluation import feature_metrics
    for name in FLAGS.variants:
        if name not in VARIANTS:
            raise ValueError(f'Unknown variant {name!r}; valid: {", ".join(VARIANTS)}')
        if SAMPLE_ONLY.get(name, name) not in FLAGS.variants:
            raise ValueError(f'{name} reuses the weights of {SAMPLE_ONLY[name]}: run both')
    base = mnist.get_config()
    extra = parse_extra(FLAGS.extra)
    num_samples = int(extra.get('sampling.num_samples', base.sampling.num_samples))
    os.makedirs(FLAGS.workdir, exist_ok=True)
    sampler = (f'DDIM η = 1, {FLAGS.sampler_steps} steps' if FLAGS.sampler_steps
               else f'{base.diffusion.num_timesteps} ancestral steps')
    results = dict(command='python ' + ' '.join(sys.argv), rows=[],
                   budget=f'{FLAGS.train_fraction:g} × each variant\'s training steps, '
                          f'{num_samples} samples of {sampler}')
    data_dir = extra.get('data.data_dir', base.data.data_dir)
    results['real_digits'] = feature_metrics.real_digit_floor(
        *data_pipeline.load_split(base.data.name, 'train', data_dir=data_dir), num_samples)
    for name in FLAGS.variants:
        results['rows'].append(study_variant(name, base.training.num_train_steps))
        write_report(results, FLAGS.workdir)
    if FLAGS.docs_dir:
        for ext in ('json', 'md'):
            shutil.copy(os.path.join(FLAGS.workdir, f'main_job_study.{ext}'), FLAGS.docs_dir)


if __name__ == '__main__':
    define_flags()  # Here, not at import: the test imports this module beside main's flags.
    app.run(main)

"""Few-step sampling study: ε, x_0, dual-output and learned-variance models on the same budget.

    python scripts/few_step_study.py --config=configs/mnist.py --workdir=runs/few_step \
        --config.training.num_train_steps=1200 --num_samples=128 --docs_dir=docs

Trains each variant of the config (resuming a finished or interrupted run), then for every step
count draws `num_samples` images with deterministic DDIM (η = 0, 'trailing' spacing, so that the
first step starts at t = T - 1 for every step count) and reports FD-MNIST5k (mnist5k data only)
and each model's test bits/dim (the full T-step bound; DDIM has no likelihood of its own). Writes
`few_step_study.json`, `few_step_study_table.md` (the table) and `few_step_study.png` (FD against
steps) to the workdir, and to `--docs_dir` when given (docs/few_step_study.md, the page around
the table, is written by hand); one sample grid per variant and step count.
"""

import json
import os
import pathlib
import shutil
import sys
import time

from absl import flags
from absl import logging

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from diffusion_jax import config_cli  # noqa: E402
from diffusion_jax import main as main_lib  # noqa: E402

VARIANTS = {
    'eps': dict(mean_type='eps'),
    'x0': dict(mean_type='x0'),
    'dual': dict(mean_type='dual'),
    'learned_range': dict(mean_type='eps', var_type='learned_range', loss_type='hybrid'),
}

FLAGS = flags.FLAGS
flags.DEFINE_list('variants', list(VARIANTS), f'Models to train, from {list(VARIANTS)}.')
flags.DEFINE_list('steps', ['5', '10', '20', '50', '100', '1000'], 'DDIM step counts.')
flags.DEFINE_integer('num_samples', 128, 'Samples per (variant, step count).')
flags.DEFINE_integer('bpd_images', 64, 'Test images in each model\'s bits/dim (0: skip).')
flags.DEFINE_string('docs_dir', None, 'Also copy the table, JSON and plot here.')


def variant_config(base, name):
    """The base config with the variant's parameterization and matching output channels."""
    from diffusion_jax import train
    config = base.copy_and_resolve_references()
    config.diffusion.update(VARIANTS[name])
    config.model.out_ch = config.data.channels * train.make_diffusion(
        config.diffusion).output_groups
    config.sampling.num_samples = 0  # The study samples itself, at each step count.
    config.sampling.sampler = 'ddim'
    config.sampling.eta = 0.0
    config.sampling.timestep_spacing = 'trailing'
    config.sampling.num_steps = min(config.sampling.num_steps, config.diffusion.num_timesteps)
    return config


def study_variant(base, name, workdir, step_counts, num_samples, bpd_images):
    """Trains one variant and returns its rows (one per step count)."""
    import jax
    from diffusion_jax import images, parallel, train
    from diffusion_jax.data import pipeline as data_pipeline
    from diffusion_jax.evaluation import feature_metrics, likelihood
    config = variant_config(base, name)
    vdir = os.path.join(workdir, name)
    start = time.perf_counter()
    train.train_and_evaluate(config, vdir)
    train_seconds = time.perf_counter() - start
    mesh = parallel.make_mesh()
    model, params, step = train.restore_ema_params(config, vdir, mesh)
    model_apply = train.make_model_apply(model)
    diffusion = train.make_diffusion(config.diffusion)
    bpd = None
    if bpd_images:
        test, _ = data_pipeline.load_split(config.data.name, 'test',
                                           data_dir=config.data.data_dir)
        bound = likelihood.bits_per_dim(
            model_apply, params, diffusion, test[:bpd_images], jax.random.key(1),
            batch_size=min(config.eval.batch_size, bpd_images),
            sharding=parallel.data_sharded(mesh), timestep_chunk=config.eval.timestep_chunk)
        bpd = float(bound['total_bpd'].mean())
    sampler = train.make_sampler(config, model, diffusion, mesh)
    rows = []
    for num_steps in step_counts:
        config.sampling.num_steps = min(num_steps, diffusion.num_timesteps)
        start = time.perf_counter()
        samples, _, _ = train.sample_images(config, sampler, params, diffusion,
                                            jax.random.key(2), mesh, num_samples=num_samples)
        row = dict(variant=name, train_steps=step, steps=config.sampling.num_steps,
                   bits_per_dim=bpd, sample_seconds=time.perf_counter() - start,
                   train_seconds=train_seconds)
        if config.data.name == 'mnist5k':
            row.update(feature_metrics.mnist5k_metrics(samples))
        images.save_png(os.path.join(vdir, f'samples_ddim{config.sampling.num_steps}.png'),
                        images.make_grid(samples[:64]),
                        scale=max(1, 64 // config.data.image_size))
        logging.info('%s', row)
        rows.append(row)
    return rows


def write_report(rows, out_dir, command):
    """few_step_study.json, few_step_study_table.md and few_step_study.png in out_dir."""
    with open(os.path.join(out_dir, 'few_step_study.json'), 'w') as f:
        json.dump(dict(command=command, rows=rows), f, indent=2)
    variants = list(dict.fromkeys(r['variant'] for r in rows))
    steps = sorted({r['steps'] for r in rows})
    metric = 'fd_mnist5k' if 'fd_mnist5k' in rows[0] else None
    by_key = {(r['variant'], r['steps']): r for r in rows}
    lines = ['| steps | ' + ' | '.join(variants) + ' |', '|---' * (len(variants) + 1) + '|']
    for s in steps:
        cells = [f'{by_key[v, s][metric]:.1f}' if metric and (v, s) in by_key else 'n/a'
                 for v in variants]
        lines.append(f'| {s} | ' + ' | '.join(cells) + ' |')
    bpd = [f'{by_key[v, steps[0]]["bits_per_dim"]:.3f}'
           if by_key[v, steps[0]]['bits_per_dim'] is not None else 'n/a' for v in variants]
    lines.append('| bits/dim (T-step bound) | ' + ' | '.join(bpd) + ' |')
    with open(os.path.join(out_dir, 'few_step_study_table.md'), 'w') as f:
        f.write(f'`{command}`\n\nFD-MNIST5k (lower is better) of DDIM (η = 0) samples:\n\n'
                + '\n'.join(lines) + '\n')
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for v in variants:
        xs = [s for s in steps if (v, s) in by_key]
        ys = [by_key[v, s].get(metric, float('nan')) if metric else float('nan') for s in xs]
        ax.plot(xs, ys, marker='o', label=v)
    ax.set_xscale('log')
    ax.set_xlabel('DDIM steps (η = 0)')
    ax.set_ylabel('FD-MNIST5k' if metric else '(no metric for this data)')
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, 'few_step_study.png'), dpi=120)
    plt.close(fig)


def main(argv):
    config_cli.setup_logging()
    base = FLAGS.config
    for name in FLAGS.variants:
        if name not in VARIANTS:
            raise ValueError(f'Unknown variant {name!r}; valid: {", ".join(VARIANTS)}')
    step_counts = [int(s) for s in FLAGS.steps]
    main_lib.configure_cpu_backend(base, -1, fast_math=True)
    os.makedirs(FLAGS.workdir, exist_ok=True)
    rows = []
    for name in FLAGS.variants:
        rows += study_variant(base, name, FLAGS.workdir, step_counts, FLAGS.num_samples,
                              FLAGS.bpd_images)
    del argv  # absl has removed the flags from it; the report records them.
    command = 'python ' + ' '.join(sys.argv)
    write_report(rows, FLAGS.workdir, command)
    if FLAGS.docs_dir:
        for name in ('few_step_study.json', 'few_step_study_table.md', 'few_step_study.png'):
            shutil.copy(os.path.join(FLAGS.workdir, name), FLAGS.docs_dir)


if __name__ == '__main__':
    config_cli.run(main)

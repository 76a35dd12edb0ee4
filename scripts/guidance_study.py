"""Guidance and SDEdit study on MNIST-5k: what each guidance scale buys and costs.

    python scripts/guidance_study.py --config=configs/mnist_cfg.py --workdir=runs/guidance \
        --docs_dir=docs

Trains (or resumes) the class-conditional U-Net of the config and the noise-aware classifier of
--classifier_config (configs/mnist_classifier.py, overridable like --config), then measures
with the frozen evaluation classifier (the one behind FD-MNIST5k, never trained on samples):

  classifier-free guidance  w in --cfg_scales: (1 + w) ε(x, y) - w ε(x, ∅)
  classifier guidance       s in --classifier_scales, on the same network's unconditional
                            branch ε(x, ∅) (so the base model is unconditional, as in Dhariwal &
                            Nichol's unconditional + guidance runs)
  SDEdit                    blocky strokes of test digits, t0 in --t0s, on ε(x, ∅)

Guided sampling uses DDIM (η = 0, trailing spacing, --ddim_steps); labels cycle through the ten
digits. For each setting: accuracy (the evaluation classifier's prediction equals the requested
label), FD-MNIST5k and classifier IS of the samples; for SDEdit the L2 distance to the guide
(faithfulness), FD-MNIST5k (realism) and the accuracy against the digit the strokes were drawn
from. Writes guidance_study.{json,md,png} and sample figures to the workdir (and --docs_dir),
the JSON after every section so an interrupted run keeps what it measured.
"""

import json
import os
import pathlib
import shutil
import sys
import time

from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from diffusion_jax import config_cli  # noqa: E402
from diffusion_jax import main as main_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list('cfg_scales', ['0', '0.5', '1', '2', '4'], 'Classifier-free guidance w.')
flags.DEFINE_list('classifier_scales', ['0', '1', '2', '4', '8'], 'Classifier guidance s.')
flags.DEFINE_list('t0s', ['0.25', '0.5', '0.75', '1.0'], 'SDEdit start times.')
flags.DEFINE_integer('num_samples', 200, 'Samples per guidance setting (labels cycle).')
flags.DEFINE_integer('ddim_steps', 50, 'DDIM steps of guided sampling.')
flags.DEFINE_integer('edit_images', 100, 'Test digits turned into strokes for SDEdit.')
config_flags.DEFINE_config_file(
    'classifier_config', str(pathlib.Path(__file__).resolve().parents[1] / 'configs' /
                             'mnist_classifier.py'),
    'The noise-aware classifier, e.g. --classifier_config.training.num_train_steps=500.',
    lock_config=True)
flags.DEFINE_string('docs_dir', None, 'Also copy the report and figures here.')

FIGURES = ('guidance_study.png', 'guidance_cfg_samples.png', 'guidance_classifier_samples.png',
           'sdedit_strokes.png')


class Study:
    """The trained networks and the measurements, with the JSON written as it grows."""

    def __init__(self, config, workdir):
        import jax
        from diffusion_jax import evaluate, parallel, train
        self.config, self.workdir = config, workdir
        self.mesh = parallel.make_mesh()
        self.results = dict(command='python ' + ' '.join(sys.argv))
        start = time.perf_counter()
        train.train_and_evaluate(config, os.path.join(workdir, 'conditional'))
        clf_config = FLAGS.classifier_config
        if clf_config.data.data_dir is None:  # One dataset for both unless told otherwise.
            clf_config.data.data_dir = config.data.data_dir
        clf_dir = os.path.join(workdir, 'classifier')
        train.train_and_evaluate(clf_config, clf_dir)
        self.results['train_seconds'] = time.perf_counter() - start
        self.results['noisy_classifier'] = evaluate.evaluate(clf_config, clf_dir)
        self.process = train.make_diffusion(config.diffusion)
        self.model, self.params, step = train.restore_ema_params(
            config, os.path.join(workdir, 'conditional'), self.mesh)
        self.classifier, self.classifier_params, _ = train.restore_ema_params(
            clf_config, clf_dir, self.mesh)
        self.results['train_steps'] = step
        self.results['classifier_train_steps'] = clf_config.training.num_train_steps
        self.sharding = parallel.data_sharded(self.mesh)
        self.rng = jax.random.key(config.seed + 1)
        self.unconditional_apply = self.make_unconditional_apply()
        self.save()

    def save(self):
        with open(os.path.join(self.workdir, 'guidance_study.json'), 'w') as f:
            json.dump(self.results, f, indent=2)

    def make_unconditional_apply(self):
        """ε(x, t, ∅), the conditional network's null-label branch, on a sampler bundle (one
        function object for the whole study: it is a jit static argument)."""
        from diffusion_jax import train
        null_label_apply = train.make_model_apply(self.model)

        def model_apply(bundle, x, t):
            return null_label_apply(bundle['params'], x, t)
        return model_apply

    def guided_samples(self, model_apply, guidance_fn, scale):
        import jax
        import jax.numpy as jnp
        import numpy as np
        from diffusion_jax import images, sampling
        n, batch = FLAGS.num_samples, self.config.sampling.batch_size
        labels = np.arange(n) % 10
        shape = (self.config.data.image_size,) * 2 + (self.config.data.channels,)
        out = []
        for i in range(0, n, batch):
            bundle = dict(params=self.params, labels=jnp.asarray(labels[i:i + batch]),
                          guidance_scale=jnp.float32(scale), classifier=self.classifier_params)
            x, _ = sampling.ddim_sample(
                model_apply, bundle, self.process, jax.random.fold_in(self.rng, i),
                (len(labels[i:i + batch]),) + shape, num_steps=FLAGS.ddim_steps, eta=0.0,
                spacing='trailing', sharding=self.sharding, guidance_fn=guidance_fn)
            out.append(images.to_uint8(jax.device_get(x)))
        return np.concatenate(out), labels

    def sweep(self, name, scales, model_apply, guidance_fn):
        rows, grids = [], []
        for scale in scales:
            start = time.perf_counter()
            samples, labels = self.guided_samples(model_apply, guidance_fn, scale)
            row = dict(scale=scale, seconds=time.perf_counter() - start,
                       **quality(samples, labels))
            logging.info('%s %s', name, row)
            rows.append(row)
            grids.append(samples[:20])
            self.results[name] = rows
            self.save()
        return grids

    def sdedit(self, t0s):
        import jax
        import numpy as np
        from diffusion_jax import evaluate, images, sampling
        test_images, test_labels = evaluate.load_test_split(self.config)
        originals = test_images[:FLAGS.edit_images]
        labels = test_labels[:FLAGS.edit_images]
        guides = sampling.blocky_strokes(originals / 127.5 - 1.0, block=4)
        bundle = dict(params=self.params)
        rows, figure = [], [originals[:10], images.to_uint8(guides[:10])]
        guides_uint8 = images.to_uint8(guides)
        rows.append(dict(t0=0.0, **edit_metrics(guides_uint8, guides_uint8, originals, labels)))
        for t0 in t0s:
            start = time.perf_counter()
            out = sampling.sdedit(self.unconditional_apply, bundle, self.process,
                                  jax.device_put(guides, self.sharding),
                                  jax.random.fold_in(self.rng, int(t0 * 1000)), t0=t0,
                                  sampling_config=self.config.sampling)
            edited = images.to_uint8(jax.device_get(out[0]))
            row = dict(t0=t0, seconds=time.perf_counter() - start,
                       **edit_metrics(edited, guides_uint8, originals, labels))
            logging.info('sdedit %s', row)
            rows.append(row)
            figure.append(edited[:10])
            self.results['sdedit'] = rows
            self.save()
        np.savez_compressed(os.path.join(self.workdir, 'sdedit_strokes.npz'),
                            originals=originals, guides=guides_uint8)
        return figure


def quality(samples, labels):
    """Accuracy of the evaluation classifier on the requested labels, and FD-MNIST5k / IS."""
    from diffusion_jax.evaluation import feature_metrics
    metrics = feature_metrics.mnist5k_metrics(samples, labels=labels)
    return {k: metrics[k] for k in ('accuracy', 'fd_mnist5k', 'classifier_is', 'num_samples')}


def edit_metrics(edited, guides, originals, labels):
    """L2 to the guide and to the original digit (per image, pixels in [0, 1]), FD-MNIST5k and
    the accuracy against the digit the strokes came from."""
    import numpy as np

    def l2(a, b):
        diff = (a.astype(np.float64) - b.astype(np.float64)) / 255.0
        return float(np.mean(np.sqrt(np.sum(diff.reshape(len(a), -1) ** 2, axis=1))))
    q = quality(edited, labels)
    return dict(l2_to_guide=l2(edited, guides), l2_to_original=l2(edited, originals),
                fd_mnist5k=q['fd_mnist5k'], accuracy=q['accuracy'])


def write_report(results, grids, out_dir):
    """guidance_study.md (tables), guidance_study.png (trade-off curves) and sample figures."""
    import numpy as np
    from diffusion_jax import images
    lines = [f'`{results["command"]}`', '']
    for name, label in (('classifier_free', 'w'), ('classifier', 's')):
        lines += [f'**{name.replace("_", "-")} guidance** ({FLAGS.num_samples} samples, DDIM '
                  f'{FLAGS.ddim_steps} steps):', '',
                  f'| {label} | accuracy | FD-MNIST5k | classifier IS |', '|---|---|---|---|']
        lines += [f'| {r["scale"]:g} | {r["accuracy"]:.3f} | {r["fd_mnist5k"]:.1f} | '
                  f'{r["classifier_is"]:.2f} |' for r in results.get(name, [])]
        lines.append('')
    lines += [f'**SDEdit** of blocky strokes ({FLAGS.edit_images} test digits; t0 = 0 is the '
              'strokes themselves):', '',
              '| t0 | L2 to guide | L2 to original | FD-MNIST5k | accuracy (original digit) |',
              '|---|---|---|---|---|']
    lines += [f'| {r["t0"]:g} | {r["l2_to_guide"]:.2f} | {r["l2_to_original"]:.2f} | '
              f'{r["fd_mnist5k"]:.1f} | {r["accuracy"]:.3f} |' for r in results.get('sdedit', [])]
    floor = results['real_data_floor']
    lines += ['', f'Real training digits, {floor["num_samples"]} at a time: FD-MNIST5k '
              f'{floor["fd_mnist5k"]:.1f} ± {floor["fd_mnist5k_std"]:.1f}, accuracy '
              f'{floor["accuracy"]:.3f}.']
    with open(os.path.join(out_dir, 'guidance_study.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, name, label in ((axes[0], 'classifier_free', 'w'), (axes[1], 'classifier', 's')):
        rows = results.get(name, [])
        ax.plot([r['fd_mnist5k'] for r in rows], [r['accuracy'] for r in rows], marker='o')
        for r in rows:
            ax.annotate(f'{label}={r["scale"]:g}', (r['fd_mnist5k'], r['accuracy']))
        ax.set(xlabel='FD-MNIST5k (lower: more realistic and diverse)',
               ylabel='accuracy on the requested label',
               title=f'{name.replace("_", "-")} guidance')
    rows = results.get('sdedit', [])
    axes[2].plot([r['l2_to_guide'] for r in rows], [r['fd_mnist5k'] for r in rows], marker='o')
    for r in rows:
        axes[2].annotate(f't0={r["t0"]:g}', (r['l2_to_guide'], r['fd_mnist5k']))
    axes[2].set(xlabel='L2 to the guide (unfaithfulness)', ylabel='FD-MNIST5k (unrealism)',
                title='SDEdit of blocky strokes')
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, 'guidance_study.png'), dpi=110)
    plt.close(fig)
    for name, key in (('guidance_cfg_samples.png', 'classifier_free'),
                      ('guidance_classifier_samples.png', 'classifier'),
                      ('sdedit_strokes.png', 'sdedit')):
        rows = grids[key]  # One row per setting.
        images.save_png(os.path.join(out_dir, name),
                        images.make_grid(np.concatenate(rows), ncol=len(rows[0])), scale=2)


def main(argv):
    del argv
    config_cli.setup_logging()
    config = FLAGS.config
    main_lib.configure_cpu_backend(config, -1, fast_math=True)
    from diffusion_jax import sampling
    os.makedirs(FLAGS.workdir, exist_ok=True)
    config.sampling.num_samples = 0  # The study samples itself.
    study = Study(config, FLAGS.workdir)
    from diffusion_jax.data import pipeline as data_pipeline
    from diffusion_jax.evaluation import feature_metrics
    study.results['real_data_floor'] = feature_metrics.real_digit_floor(
        *data_pipeline.load_split(config.data.name, 'train', data_dir=config.data.data_dir),
        FLAGS.num_samples)
    grids = {}
    free = sampling.make_sampling_model(study.model, study.process, 'classifier_free')
    grids['classifier_free'] = study.sweep(
        'classifier_free', [float(s) for s in FLAGS.cfg_scales], *free)
    _, gradient = sampling.make_sampling_model(study.model, study.process, 'classifier',
                                               study.classifier)
    grids['classifier'] = study.sweep('classifier', [float(s) for s in FLAGS.classifier_scales],
                                      study.unconditional_apply, gradient)
    grids['sdedit'] = study.sdedit([float(t) for t in FLAGS.t0s])
    study.save()
    write_report(study.results, grids, FLAGS.workdir)
    if FLAGS.docs_dir:
        for name in ('guidance_study.json', 'guidance_study.md') + FIGURES:
            shutil.copy(os.path.join(FLAGS.workdir, name), FLAGS.docs_dir)


if __name__ == '__main__':
    config_cli.run(main)

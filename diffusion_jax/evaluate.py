"""--mode=eval and --mode=sample on a trained workdir (the EMA weights of its latest checkpoint)."""

import csv
import json
import logging
import os
import time

import jax
import numpy as np

from diffusion_jax import distributed
from diffusion_jax import images
from diffusion_jax import parallel
from diffusion_jax import sampling
from diffusion_jax import sde as sde_lib
from diffusion_jax import train
from diffusion_jax.data import pipeline as data_pipeline
from diffusion_jax.evaluation import feature_metrics
from diffusion_jax.evaluation import fid
from diffusion_jax.evaluation import likelihood
from diffusion_jax.evaluation import ode_likelihood
from diffusion_jax.evaluation import reference_stats


def sample(config, workdir):
    """Writes samples.npz, samples.png and progressive.png from the workdir's EMA weights."""
    mesh = parallel.make_mesh()
    diffusion = train.make_diffusion(config.diffusion)
    sampling.check_sampling_config(config.sampling, diffusion)
    model, params, step = train.restore_ema_params(config, workdir, mesh)
    logging.info('Sampling from the EMA weights of step %d', step)
    return train.write_final_samples(config, workdir,
                                     train.make_sampler(config, model, diffusion, mesh), params,
                                     diffusion, mesh)


def evaluate(config, workdir):
    """Test bits/dim and (MNIST-5k) sample quality in eval.json. DDPM: the variational bound,
    rate–distortion and the interpolation figure; score SDEs: the exact likelihood of the
    probability flow ODE; NCSN has no likelihood (only sample quality)."""
    mesh = parallel.make_mesh()
    model, params, step = train.restore_ema_params(config, workdir, mesh)
    diffusion = train.make_diffusion(config.diffusion)
    test_images, test_labels = load_test_split(config)
    test_images = test_images[:config.eval.num_images]
    model_apply = train.make_model_apply(model)  # One object: it is a jit static argument.
    rng = jax.random.fold_in(jax.random.key(config.seed), 0xE7A1)
    results = dict(step=step)
    if config.task == 'noisy_classifier':
        results.update(_classifier_accuracy(config, model_apply, params, diffusion, test_images,
                                            test_labels[:config.eval.num_images]))
    elif isinstance(diffusion, sde_lib.SDE):
        results.update(_ode_bits_per_dim(config, model_apply, params, diffusion, test_images,
                                         rng, mesh))
    elif not isinstance(diffusion, sde_lib.NCSN):
        results.update(_bound_bits_per_dim(config, workdir, model_apply, params, diffusion,
                                           test_images, rng, mesh))
        _write_interpolation(config, workdir, model_apply, params, diffusion, test_images, mesh)
    if config.task == 'diffusion':
        results.update(_sample_quality(config, workdir))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, 'eval.json'), 'w') as f:
            json.dump(results, f, indent=2)
    return results


def load_test_split(config):
    """The configured dataset's test images (uint8, checked against the config) and labels."""
    test_images, test_labels = distributed.process_zero_first(
        lambda: data_pipeline.load_configured_split(config.data, 'test',
                                                    num_classes=config.model.num_classes),
        'prepare the dataset')
    data_pipeline.check_images(test_images, image_size=config.data.image_size,
                               channels=config.data.channels)
    return test_images, test_labels


def _classifier_accuracy(config, model_apply, params, process, test_images, test_labels,
                         num_levels=5):
    """A noise-aware classifier's test accuracy on x_t at evenly spaced times, from the clean
    image (t = 0) to pure noise (the last level, where chance is 1 / K)."""
    x0 = jax.numpy.asarray(test_images, jax.numpy.float32) / 127.5 - 1.0
    if isinstance(process, sde_lib.SDE):
        levels = np.linspace(process.train_eps, 1.0, num_levels)
    else:
        levels = np.linspace(0, process.num_timesteps - 1, num_levels).round().astype(np.int32)
    noise = jax.random.normal(jax.random.key(config.seed), x0.shape)
    accuracy = {}
    for level in levels:
        t = jax.numpy.full((len(x0),), level)
        logits = model_apply(params, process.q_sample(x0, t, noise), process.time_label(t))
        accuracy[f'{level:.4g}'] = float(np.mean(np.asarray(logits).argmax(-1) == test_labels))
    logging.info('Noisy-classifier test accuracy by t: %s', accuracy)
    return dict(num_images=len(x0), accuracy_by_t=accuracy)


def _summary(bpd, seconds, **extra):
    results = dict(num_images=len(bpd), bits_per_dim=float(bpd.mean()),
                   bits_per_dim_stderr=float(bpd.std(ddof=1) / np.sqrt(len(bpd))),
                   seconds=seconds, **extra)
    logging.info('Test bits/dim %.4f ± %.4f over %d images (%.0f s)', results['bits_per_dim'],
                 results['bits_per_dim_stderr'], len(bpd), seconds)
    return results


def _bound_bits_per_dim(config, workdir, model_apply, params, diffusion, test_images, rng, mesh):
    """The DDPM bound (eq. 5) and rate–distortion (rate_distortion.{csv,png})."""
    start = time.perf_counter()
    bound = likelihood.bits_per_dim(
        model_apply, params, diffusion, test_images, rng, batch_size=config.eval.batch_size,
        sharding=parallel.data_sharded(mesh), timestep_chunk=config.eval.timestep_chunk)
    results = _summary(bound['total_bpd'], time.perf_counter() - start,
                       prior_bpd=float(bound['prior_bpd'].mean()),
                       decoder_bpd=float(bound['terms_bpd'][0]))
    rate, distortion = likelihood.rate_distortion(
        bound['terms_bpd'], bound['prior_bpd'].mean(), bound['x0_mse'])
    if jax.process_index() == 0:
        _write_bound_csv(os.path.join(workdir, 'rate_distortion.csv'), bound, rate, distortion)
        _plot_rate_distortion(os.path.join(workdir, 'rate_distortion.png'), rate, distortion)
    return results


def _ode_bits_per_dim(config, model_apply, params, sde, test_images, rng, mesh):
    """Dequantized bits/dim under the probability flow ODE (Hutchinson trace estimator)."""
    start = time.perf_counter()
    out = ode_likelihood.bits_per_dim(
        model_apply, params, sde, test_images, rng, batch_size=config.eval.batch_size,
        rtol=config.sampling.ode_rtol, atol=config.sampling.ode_atol,
        solver=config.sampling.ode_solver, sharding=parallel.data_sharded(mesh))
    return _summary(out['bpd'], time.perf_counter() - start, likelihood='probability_flow_ode',
                    ode_solver_steps=out['solver_steps'].tolist())


def _write_interpolation(config, workdir, model_apply, params, diffusion, test_images, mesh):
    """interpolation.png (paper Fig. 8): rows are pairs of test images, columns λ = 0 .. 1."""
    num_pairs, num_lambdas = min(4, len(test_images) // 2), 8
    x0 = jax.numpy.asarray(test_images[:2 * num_pairs], jax.numpy.float32) / 127.5 - 1.0
    t = min(config.eval.interpolation_t, diffusion.num_timesteps - 1)
    decoded = sampling.interpolate(
        model_apply, params, diffusion, x0[0::2], x0[1::2],
        jax.random.fold_in(jax.random.key(config.seed), 0x1E7), t=t,
        num_lambdas=num_lambdas, clip_denoised=config.sampling.clip_denoised,
        chunk_size=config.sampling.chunk_size,
        sharding=parallel.data_sharded(mesh) if num_lambdas % mesh.devices.size == 0 else None)
    # Each row: source a, the decoded mixes, source b.
    rows = np.concatenate([images.to_uint8(x0[0::2])[:, None], images.to_uint8(decoded),
                           images.to_uint8(x0[1::2])[:, None]], axis=1)
    if jax.process_index() == 0:
        images.save_png(os.path.join(workdir, 'interpolation.png'),
                        images.make_grid(rows.reshape((-1,) + rows.shape[2:]),
                                         ncol=rows.shape[1]),
                        scale=max(1, 64 // config.data.image_size))


def _sample_quality(config, workdir):
    """Metrics of the workdir's samples.npz: FD-MNIST5k / KID / classifier IS for MNIST-5k runs,
    Inception FID / IS when `eval.inception_weights` (and `eval.fid_reference`) are set.

    FD-MNIST5k is never called FID: its features are those of the small classifier shipped in
    the package.
    """
    samples_path = os.path.join(workdir, 'samples.npz')
    wanted = config.data.name == 'mnist5k' or config.eval.inception_weights
    if not wanted or not os.path.exists(samples_path):
        logging.info('No sample-quality metrics: they need samples.npz (write it with '
                     '--mode=sample) and an mnist5k run or --config.eval.inception_weights')
        return {}
    with np.load(samples_path, allow_pickle=False) as f:
        samples = f['images']
    metrics = {}
    if config.data.name == 'mnist5k':
        metrics.update(feature_metrics.mnist5k_metrics(samples))
        logging.info('FD-MNIST5k %.3f, KID %.3g ± %.3g, classifier IS %.3f (%d samples)',
                     metrics['fd_mnist5k'], metrics['kid_mean'], metrics['kid_std'],
                     metrics['classifier_is'], metrics['num_samples'])
    if config.eval.inception_weights:
        reference = config.eval.fid_reference or reference_stats.ensure_reference(config)
        inception = fid.inception_metrics(samples, config.eval.inception_weights, reference,
                                          batch_size=config.eval.inception_batch_size,
                                          splits=config.eval.inception_splits)
        logging.info('Inception FID %s, IS %.3f ± %.3f (%d samples)',
                     f'{inception["fid"]:.3f}' if 'fid' in inception else '(no reference)',
                     inception['inception_score'], inception['inception_score_std'],
                     inception['num_samples'])
        metrics.update(inception)
    return metrics


def _write_bound_csv(path, bound, rate, distortion):
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['t', 'term_bpd', 'x0_mse', 'rate_bpd', 'distortion_rmse'])
        for t in range(len(rate)):
            writer.writerow([t, bound['terms_bpd'][t], bound['x0_mse'][t], rate[t],
                             distortion[t]])


def _plot_rate_distortion(path, rate, distortion):
    """The paper's Fig. 5: distortion and rate against reverse steps, and against each other."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    steps = len(rate) - np.arange(len(rate))  # Reverse steps taken to reach x_t.
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, distortion)
    axes[0].set(xlabel='reverse steps (T - t)', ylabel='distortion (RMSE, [0, 255])')
    axes[1].plot(steps, rate)
    axes[1].set(xlabel='reverse steps (T - t)', ylabel='rate (bits/dim)')
    axes[2].plot(rate, distortion)
    axes[2].set(xlabel='rate (bits/dim)', ylabel='distortion (RMSE, [0, 255])')
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

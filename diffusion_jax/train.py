"""Wiring of a training run: data, model, state, the sharded step, checkpoints, samples.

Every phase is a helper; `train_and_evaluate` only calls them in order.
"""

import functools
import json
import logging
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from diffusion_jax import checkpointing
from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import distributed
from diffusion_jax import errors
from diffusion_jax import images
from diffusion_jax import losses
from diffusion_jax import parallel
from diffusion_jax import reporting
from diffusion_jax import safeguards
from diffusion_jax import sampling
from diffusion_jax import schedules
from diffusion_jax import sde as sde_lib
from diffusion_jax import train_state as train_state_lib
from diffusion_jax.data import folder as data_folder
from diffusion_jax.data import pipeline as data_pipeline
from diffusion_jax.models import NoisyClassifier
from diffusion_jax.models import UNet


def make_diffusion(diffusion_config):
    """The process of a config's `diffusion` block: DDPM's `Diffusion`, an `sde.SDE` (vp, subvp,
    ve) or an `sde.NCSN`; each gives the training loss its t, x_t and loss."""
    name = diffusion_config.process
    if name != 'ddpm':
        return _make_score_process(diffusion_config)
    betas = schedules.get_beta_schedule(
        diffusion_config.beta_schedule, diffusion_config.num_timesteps,
        beta_start=diffusion_config.beta_start, beta_end=diffusion_config.beta_end)
    return diffusion_lib.Diffusion.create(
        betas, mean_type=diffusion_config.mean_type, var_type=diffusion_config.var_type,
        loss_type=diffusion_config.loss_type, hybrid_lambda=diffusion_config.hybrid_lambda)


def _make_score_process(c):
    if (c.mean_type, c.var_type, c.loss_type) != ('eps', 'fixedlarge', 'mse'):
        raise ValueError(f'diffusion.process={c.process!r} trains an ε-network with the denoising '
                         'score matching loss: leave mean_type, var_type and loss_type at eps, '
                         'fixedlarge and mse')
    if c.process == 'ncsn':
        return sde_lib.NCSN(num_scales=c.num_timesteps, sigma_min=c.sigma_min,
                            sigma_max=c.sigma_max)
    if c.process not in sde_lib.SDE_NAMES:
        raise ValueError(f'Unknown diffusion.process {c.process!r}; valid: ddpm, ncsn, '
                         f'{", ".join(sde_lib.SDE_NAMES)}')
    return sde_lib.get_sde(c.process, num_scales=c.num_timesteps, beta_min=c.beta_min,
                           beta_max=c.beta_max, sigma_min=c.sigma_min, sigma_max=c.sigma_max,
                           train_eps=c.train_eps, sample_eps=c.sample_eps,
                           likelihood_weighting=c.likelihood_weighting)


TASKS = ('diffusion', 'noisy_classifier')


def make_model(config):
    """The network of a config: for task=diffusion the U-Net, after checking its output channels
    fit the data and the parameterization (ε / x_0 / dual outputs, learned variance); for
    task=noisy_classifier the classifier on the U-Net's encoder."""
    if config.task not in TASKS:
        raise ValueError(f'Unknown task {config.task!r}; valid: {", ".join(TASKS)}')
    _check_precision(config.model)
    if config.task == 'noisy_classifier':
        if config.model.num_classes < 2:
            raise ValueError('task=noisy_classifier needs model.num_classes >= 2 (the classes it '
                             f'predicts), got {config.model.num_classes}')
        fields = {k: v for k, v in config.model.items() if k != 'out_ch'}
        return NoisyClassifier(**fields)
    diffusion = config.diffusion
    expected = config.data.channels * make_diffusion(diffusion).output_groups
    if config.model.out_ch != expected:
        raise ValueError(
            f'model.out_ch={config.model.out_ch} but {config.data.channels}-channel images with '
            f'mean_type {diffusion.mean_type!r} and var_type {diffusion.var_type!r} need '
            f'{expected}: set --config.model.out_ch={expected}')
    return UNet(**config.model)


COMPUTE_DTYPES = ('float32', 'bfloat16', 'float64')  # float64 for the gradient checks.
PARAM_DTYPES = ('float32', 'bfloat16', 'float64')


def _check_precision(model_config):
    for key, valid in (('dtype', COMPUTE_DTYPES), ('param_dtype', PARAM_DTYPES)):
        value = model_config.get(key, 'float32')
        if (value if isinstance(value, str) else jnp.dtype(value).name) not in valid:
            raise ValueError(f'model.{key}={value!r} is not a supported dtype; valid: '
                             f'{", ".join(valid)}')


def make_model_apply(model):
    """(params, x, t) -> output in inference mode; make it once per run (it is a jit static).

    A class-conditional U-Net is given the null label: its unconditional branch ε(x, t, ∅), so
    bits/dim, interpolation and encoders measure the model of p(x). Guided and conditional
    sampling go through `make_sampler` instead.
    """
    def model_apply(params, x, t):
        kwargs = {}
        if getattr(model, 'label_classes', 0):
            kwargs['y'] = jnp.full((x.shape[0],), model.label_classes, jnp.int32)
        return model.apply({'params': params}, x, t, train=False, **kwargs)
    return model_apply


def make_input_pipeline(config):
    """The training split of the configured dataset as a resumable per-process iterator."""
    data = config.data
    train_images, train_labels = distributed.process_zero_first(
        lambda: data_pipeline.load_configured_split(data, 'train',
                                                    num_classes=config.model.num_classes),
        'prepare the dataset')
    data_pipeline.check_images(train_images, image_size=data.image_size, channels=data.channels)
    return data_pipeline.InputPipeline(
        train_images, train_labels, global_batch_size=config.training.batch_size,
        seed=config.seed, random_flip=data.random_flip,
        process_index=jax.process_index(), process_count=jax.process_count())


def init_params(model, config, rng):
    """The U-Net's initial parameters for the config's image shape.

    Call under `jax.threefry_partitionable(False)` for speed: the values do not depend on the
    sharding either way, and the non-partitionable threefry compiles the ~100 distinct
    initializer draws about 5x faster on CPU.
    """
    shape = (1, config.data.image_size, config.data.image_size, config.data.channels)
    kwargs = {'y': jnp.zeros((1,), jnp.int32)} if model.label_classes else {}
    return model.init({'params': rng}, jnp.zeros(shape, jnp.float32),
                      jnp.zeros((1,), jnp.int32), train=False, **kwargs)['params']


def init_or_restore_state(config, model, optimizer, mesh, manager, *, quarantine_dir=None):
    """The sharded train state and the pipeline position: restored if a checkpoint exists.

    With `manager=None` the state is always freshly initialised. A corrupt checkpoint falls back
    to the previous one (see `checkpointing.restore_latest`, which `quarantine_dir` is passed to).

    Returns:
      (state, shardings, data_state or None).
    """
    def init(rng):
        return train_state_lib.create_train_state(init_params(model, config, rng), optimizer)

    init_rng = jax.random.fold_in(jax.random.key(config.seed), 0x5EED)
    abstract_state = jax.eval_shape(init, init_rng)  # Shapes only: nothing is allocated.
    shardings = parallel.state_shardings(abstract_state, mesh,
                                         rules=config.training.param_sharding)
    num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
    logging.info('U-Net with %s parameters', f'{num_params:,}')
    restored = None if manager is None else checkpointing.restore_latest(
        manager, checkpointing.abstract_with_shardings(abstract_state, shardings),
        quarantine_dir=quarantine_dir)
    if restored is not None:
        state, data_state, _ = restored
        return state, shardings, data_state
    with jax.threefry_partitionable(False):  # See init_params.
        state = jax.jit(init, out_shardings=shardings)(init_rng)
    return state, shardings, None


def restore_ema_params(config, workdir, mesh):
    """(model, EMA parameters, step) of the latest checkpoint in `workdir`."""
    model = make_model(config)
    optimizer = train_state_lib.make_optimizer(
        config.optim, clip=not config.training.clip_per_replica)
    manager = checkpointing.make_manager(workdir, keep=config.training.keep_checkpoints)
    if manager.latest_step() is None:
        raise errors.MissingInputError(f'no checkpoint in {os.path.join(workdir, "checkpoints")}: '
                                       'train first (--mode=train)')
    state, _, _ = init_or_restore_state(config, model, optimizer, mesh, manager)
    manager.close()
    return model, state.ema_params, int(jax.device_get(state.step))


def build_step(config, model, diffusion, optimizer, mesh, shardings):
    if config.task == 'noisy_classifier':
        loss_fn = losses.make_classifier_loss(model, diffusion)
    else:
        loss_fn = losses.make_diffusion_loss(model, diffusion,
                                             label_dropout=config.training.label_dropout)
    return parallel.build_train_step(
        loss_fn=loss_fn, optimizer=optimizer, optim_config=config.optim,
        process=diffusion, mesh=mesh, shardings=shardings,
        mode=config.training.parallel, clip_per_replica=config.training.clip_per_replica,
        skip_nonfinite=config.training.nan_policy == 'skip',
        num_microbatches=config.training.num_microbatches)


def compile_step(step_fn, state, batch, rng):
    """Ahead-of-time compilation of the train step, with its time logged."""
    logging.info('Compiling the train step...')
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch, rng).compile()
    logging.info('Compiled the train step in %.1f s', time.perf_counter() - start)
    return compiled


# The fields that define q(x_t | x_0), which a guidance classifier must share with the model.
_FORWARD_PROCESS_KEYS = ('process', 'beta_schedule', 'beta_start', 'beta_end', 'num_timesteps',
                         'beta_min', 'beta_max', 'sigma_min', 'sigma_max')


class Sampler(NamedTuple):
    """The configured sampling network: `model_apply` and `guidance_fn` (jit statics, made once
    per run) take a bundle of parameters, labels and guidance scale (`sampling.guidance`)."""
    model_apply: Callable
    guidance_fn: Callable | None
    classifier_params: Any
    num_classes: int  # Label classes (0: unconditional, unguided).


def make_sampler(config, model, process, mesh):
    """The `Sampler` of a config; classifier guidance restores the classifier of
    `sampling.classifier_workdir` (its own config.json) and checks it shares the process."""
    s = config.sampling
    classifier = classifier_params = None
    num_classes = model.num_classes
    if s.guidance == 'classifier':
        classifier_config = checkpointing.load_config(s.classifier_workdir)
        if classifier_config.task != 'noisy_classifier':
            raise ValueError(f'sampling.classifier_workdir={s.classifier_workdir!r} holds a '
                             f'task={classifier_config.task!r} run, not a noisy_classifier')
        differ = [k for k in _FORWARD_PROCESS_KEYS
                  if classifier_config.diffusion[k] != config.diffusion[k]]
        if differ:
            raise ValueError('the guidance classifier was trained on another forward process: '
                             f'diffusion.{", diffusion.".join(differ)} differ from this run\'s')
        if model.num_classes and classifier_config.model.num_classes != model.num_classes:
            raise ValueError(f'the guidance classifier has {classifier_config.model.num_classes} '
                             f'classes but the class-conditional model {model.num_classes}')
        classifier, classifier_params, _ = restore_ema_params(
            classifier_config, s.classifier_workdir, mesh)
        num_classes = classifier.num_classes
    model_apply, guidance_fn = sampling.make_sampling_model(model, process, s.guidance,
                                                            classifier)
    return Sampler(model_apply, guidance_fn, classifier_params, num_classes)


def sampler_params(config, sampler, params, labels):
    """The bundle `sampler.model_apply` and `sampler.guidance_fn` take."""
    bundle = dict(params=params, labels=jnp.asarray(labels, jnp.int32),
                  guidance_scale=jnp.float32(config.sampling.guidance_scale))
    if sampler.classifier_params is not None:
        bundle['classifier'] = sampler.classifier_params
    return bundle


def sample_images(config, sampler, params, diffusion, rng, mesh, *, num_samples,
                  progress=True):
    """`num_samples` samples of the configured sampler as uint8, their labels (int32, -1 when
    unconditional) and the first batch's x̂_0 snapshots."""
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    batch_size = min(config.sampling.batch_size, num_samples)
    sharding = (parallel.data_sharded(mesh) if batch_size % mesh.devices.size == 0 else None)
    num_batches = -(-num_samples // batch_size)
    labels = np.full((num_batches * batch_size,), -1, np.int32)
    if sampler.num_classes:
        labels = sampling.sample_labels(config.sampling.labels, len(labels),
                                        sampler.num_classes, jax.random.fold_in(rng, 0x1AB))
    samples, snapshots = [], None
    for i in range(num_batches):
        bundle = sampler_params(config, sampler, params,
                                labels[i * batch_size:(i + 1) * batch_size])
        x0, snaps = sampling.sample_batch(config.sampling, sampler.model_apply, bundle,
                                          diffusion, jax.random.fold_in(rng, i),
                                          (batch_size,) + shape, progress=progress,
                                          sharding=sharding, guidance_fn=sampler.guidance_fn)
        samples.append(images.to_uint8(distributed.to_host(x0)))
        if snapshots is None:
            snapshots = images.to_uint8(distributed.to_host(snaps))
    return np.concatenate(samples)[:num_samples], labels[:num_samples], snapshots


def write_final_samples(config, workdir, sampler, params, diffusion, mesh):
    """samples.npz (images, labels), samples.png and progressive.png (paper Fig. 6) from the
    EMA weights."""
    rng = jax.random.fold_in(jax.random.key(config.seed), 0x5A3)
    start = time.perf_counter()
    samples, labels, snapshots = sample_images(config, sampler, params, diffusion, rng, mesh,
                                               num_samples=config.sampling.num_samples)
    logging.info('Sampled %d images in %.1f s', len(samples), time.perf_counter() - start)
    if jax.process_index() != 0:
        return samples
    np.savez_compressed(os.path.join(workdir, 'samples.npz'), images=samples, labels=labels)
    scale = max(1, 64 // config.data.image_size)
    images.save_png(os.path.join(workdir, 'samples.png'), images.make_grid(samples), scale=scale)
    # Rows: samples; columns: x̂_0 predicted at t = T - chunk, ..., 0.
    rows = snapshots[:, :min(8, snapshots.shape[1])].transpose(1, 0, 2, 3, 4)
    images.save_png(os.path.join(workdir, 'progressive.png'),
                    images.make_grid(rows.reshape((-1,) + rows.shape[2:]),
                                     ncol=snapshots.shape[0]), scale=scale)
    return samples


def write_class_names(config, workdir):
    """Saves the folder dataset's label -> subfolder mapping as `WORKDIR/class_names.json`."""
    data = config.data
    names = data_folder.folder_config(data.folder, image_size=data.image_size,
                                      channels=data.channels).class_names
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'class_names.json'), 'w') as f:
        json.dump({'folder': data.folder, 'labels': dict(enumerate(names))}, f, indent=2)


def train_and_evaluate(config, workdir):
    """Trains (resuming from the latest checkpoint in `workdir`), then writes samples."""
    training = config.training
    mesh = parallel.make_mesh()
    parallel.check_global_batch(training.batch_size, mesh, training.num_microbatches)
    diffusion = make_diffusion(config.diffusion)
    is_diffusion = config.task == 'diffusion'
    if is_diffusion:
        sampling.check_sampling_config(config.sampling, diffusion)
    model = make_model(config)
    safeguards.NanGuard(training.nan_policy, training.max_consecutive_skips)  # Checks the names.
    input_pipeline = make_input_pipeline(config)
    if config.data.name == 'folder' and jax.process_index() == 0:
        write_class_names(config, workdir)
    manager = checkpointing.make_manager(workdir, keep=training.keep_checkpoints,
                                         save_interval_steps=training.checkpoint_every)
    try:
        try:
            state, preempted, sampler, writer = _restore_and_train(
                config, workdir, mesh, diffusion, model, input_pipeline, manager)
            manager.wait_until_finished()
            reporting.plot_loss_curve(writer.jsonl_path, os.path.join(workdir, 'loss.png'))
            if preempted:
                logging.warning('Preempted: saved step %d; run the same command again to '
                                'resume', int(jax.device_get(state.step)))
            elif is_diffusion and config.sampling.num_samples > 0:
                write_final_samples(config, workdir, sampler, state.ema_params, diffusion, mesh)
            writer.close()
        finally:  # Also on errors: a save already under way completes instead of being cut off.
            try:
                manager.wait_until_finished()
            finally:
                manager.close()
    except Exception as e:  # A full disk is the user's to fix: say so in one line.
        disk_full = checkpointing.disk_full_error(e, manager)
        if disk_full is None:
            raise
        raise disk_full from e
    return state


def _restore_and_train(config, workdir, mesh, diffusion, model, input_pipeline, manager):
    """(state, preempted, sampler, writer) after training to num_train_steps or a preemption."""
    training = config.training
    is_diffusion = config.task == 'diffusion'
    optimizer = train_state_lib.make_optimizer(config.optim, clip=not training.clip_per_replica)
    state, shardings, data_state = init_or_restore_state(
        config, model, optimizer, mesh, manager,
        quarantine_dir=os.path.join(workdir, 'corrupt_checkpoints'))
    if data_state is not None:
        input_pipeline.set_state(data_state)
    # Written only now: a run refused above (another model's checkpoint) keeps its config.json.
    checkpointing.save_config(workdir, config)
    start_step = int(jax.device_get(state.step))
    writer = reporting.MetricWriter(workdir, resume_step=start_step)
    sampler = make_sampler(config, model, diffusion, mesh) if is_diffusion else None
    preempted = False
    if start_step < training.num_train_steps:
        sample_grid_fn = is_diffusion and functools.partial(
            _write_sample_grid, config, workdir, sampler, diffusion, mesh, writer)
        state, preempted = _train_loop(
            config, state, input_pipeline, mesh, manager, writer,
            build_step(config, model, diffusion, optimizer, mesh, shardings),
            jax.random.key(config.seed), sample_grid_fn)
    return state, preempted, sampler, writer


def _write_sample_grid(config, workdir, sampler, diffusion, mesh, writer, step, params):
    rng = jax.random.fold_in(jax.random.key(config.seed), step)
    samples, _, _ = sample_images(config, sampler, params, diffusion, rng, mesh,
                                  num_samples=config.training.sample_grid_size, progress=False)
    grid = images.make_grid(samples)
    writer.write_image(step, 'samples', grid)
    if jax.process_index() == 0:
        images.save_png(os.path.join(workdir, 'sample_grids', f'step_{step:08d}.png'), grid)


def _train_loop(config, state, input_pipeline, mesh, manager, writer, step_fn, base_rng,
                sample_grid_fn):
    """Steps until num_train_steps or a preemption; returns (state, preempted)."""
    training = config.training
    start_step = int(jax.device_get(state.step))
    batch = parallel.make_global_batch(input_pipeline.next(), mesh)
    step_fn = compile_step(step_fn, state, batch, base_rng)
    nan_guard = safeguards.NanGuard(training.nan_policy, training.max_consecutive_skips)
    pending, last_log = [], (start_step, time.perf_counter())
    bar = tqdm(total=training.num_train_steps, initial=start_step, desc='training', unit='step',
               disable=jax.process_index() != 0)
    preempted = False
    try:  # The bar ends its line also on errors: a message after it starts on its own.
        with safeguards.PreemptionWatch() as preemption:
            for step in range(start_step, training.num_train_steps):
                if step > start_step:
                    batch = parallel.make_global_batch(input_pipeline.next(), mesh)
                state, metrics = step_fn(state, batch, base_rng)
                pending.append(metrics)
                done = step + 1
                bar.update(1)
                preempted = preemption.reached(done, manager)
                is_last = done == training.num_train_steps or preempted
                if done % training.log_every == 0 or is_last or manager.should_save(done):
                    pending = jax.device_get(pending)
                    means = nan_guard.check(pending, done - len(pending))
                    elapsed = time.perf_counter() - last_log[1]
                    steps_per_sec = (done - last_log[0]) / max(elapsed, 1e-9)
                    means.update(steps_per_sec=steps_per_sec,
                                 images_per_sec=steps_per_sec * training.batch_size)
                    writer.write_scalars(done, means)
                    if 'loss' in means:
                        bar.set_postfix(loss=f'{means["loss"]:.4f}')
                    pending, last_log = [], (done, time.perf_counter())
                checkpointing.save(manager, done, state, input_pipeline.get_state(), force=is_last)
                if preempted:
                    break
                if (sample_grid_fn and training.sample_every and done % training.sample_every == 0
                        and not is_last):
                    sample_grid_fn(done, state.ema_params)
    finally:
        bar.close()
    writer.flush()
    return state, preempted

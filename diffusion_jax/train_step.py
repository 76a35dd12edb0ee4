"""The pure training step: (state, batch, base_rng) -> (state, metrics).

Randomness is a function of the step alone, rng = fold_in(base_rng, step), so a resumed run
draws exactly what an uninterrupted one would, and nothing random lives in the checkpoint.

Gradient accumulation (`accumulate_gradients`) runs the loss and its gradient over a batch in
microbatches, one after the other, and averages them: the same mean loss and gradient (the
losses are means over their batch and every microbatch has the same size), with the
activations of one microbatch alive at a time: a memory lever (on the CPU it was measured
10% slower per image than one batch; docs/benchmarks.md).
"""

import jax
import jax.numpy as jnp
import optax

from diffusion_jax import losses
from diffusion_jax import train_state as train_state_lib


def split_microbatches(tree, num_microbatches):
    """Arrays [B, ...] -> [num_microbatches, B / num_microbatches, ...], microbatch j holding
    rows j, j + k, j + 2k, ... (k = num_microbatches). Interleaved rather than contiguous so
    that when B is split over devices in contiguous blocks of a multiple of k rows, each
    device's rows of every microbatch are rows it already holds: no data moves."""
    def split(x):
        if x.shape[0] % num_microbatches:
            raise ValueError(f'batch of {x.shape[0]} rows does not split into '
                             f'{num_microbatches} microbatches')
        return x.reshape(x.shape[0] // num_microbatches, num_microbatches,
                         *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, tree)


def accumulate_gradients(grad_fn, num_microbatches, constrain=lambda tree: tree):
    """`grad_fn` over `num_microbatches` microbatches in a `lax.scan`, averaged.

    Args:
      grad_fn: (params, batch, t, noise, rng) -> ((loss, metrics), grads), the loss and every
        metric a mean over the batch.
      num_microbatches: k >= 1; the batch's rows must divide by k (1 returns `grad_fn`).
      constrain: applied to the split (batch, t, noise); `parallel` pins their sharding here so
        that each device keeps its own rows.

    Returns:
      A function of grad_fn's signature. Microbatch j gets the key fold_in(rng, j) (dropout,
      label dropout); t and noise are the batch's own, so without dropout the result equals
      grad_fn on the whole batch up to float rounding.
    """
    if num_microbatches < 1:
        raise ValueError(f'num_microbatches must be >= 1, got {num_microbatches}')
    if num_microbatches == 1:
        return grad_fn

    def accumulated(params, batch, t, noise, rng):
        microbatches = constrain(split_microbatches((batch, t, noise), num_microbatches))

        def add_one(total, inputs):
            index, (batch_j, t_j, noise_j) = inputs
            out = grad_fn(params, batch_j, t_j, noise_j, jax.random.fold_in(rng, index))
            return (out if total is None else jax.tree.map(jnp.add, total, out)), None

        # The first microbatch starts the sum (rather than zeros): its outputs carry the types
        # the scan needs, device-varying ones included inside a shard_map.
        first = add_one(None, (0, jax.tree.map(lambda x: x[0], microbatches)))[0]
        total, _ = jax.lax.scan(add_one, first,
                                (jnp.arange(1, num_microbatches),
                                 jax.tree.map(lambda x: x[1:], microbatches)))
        return jax.tree.map(lambda x: x / num_microbatches, total)

    return accumulated


def train_step(state, batch, base_rng, *, grad_fn, optimizer, optim_config, process,
               skip_nonfinite=False):
    """One step of Algorithm 1 on a global batch.

    Args:
      state: `TrainState`.
      batch: dict with `image` [B, H, W, C] in [-1, 1] (and `label` [B] where the loss uses it).
      base_rng: the run's key.
      grad_fn: (params, batch, t, noise, rng) -> ((loss, metrics), grads); either
        `jax.value_and_grad(loss_fn, has_aux=True)` or the shard_map version from `parallel`.
      optimizer: the optax transformation `state.opt_state` belongs to.
      optim_config: the `optim` config block (EMA decay, schedule).
      process: the `Diffusion`, `sde.SDE` or `sde.NCSN` that draws t.
      skip_nonfinite: drop the update when the loss or the gradient is not finite: parameters,
        EMA and optimizer state stay as they were, the step count advances (the next step draws
        the next batch and key), and metrics['skipped'] is 1 (training.nan_policy=skip).

    Returns:
      (new state, metrics dict of scalars).
    """
    rng = jax.random.fold_in(base_rng, state.step)
    noise_rng, loss_rng = jax.random.split(rng)
    t, noise = losses.draw_timesteps_and_noise(noise_rng, batch['image'], process)
    (_, metrics), grads = grad_fn(state.params, batch, t, noise, loss_rng)
    new_state = train_state_lib.apply_gradients(state, grads, optimizer, optim_config)
    grad_norm = optax.global_norm(grads)
    metrics = dict(metrics, grad_norm=grad_norm,
                   learning_rate=train_state_lib.make_lr_schedule(optim_config)(state.step))
    if skip_nonfinite:
        finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(grad_norm)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                                 state.replace(step=new_state.step))
        metrics['skipped'] = 1 - finite.astype(jnp.int32)
    return new_state, metrics

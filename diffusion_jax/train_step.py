"""The pure training step: (state, batch, base_rng) -> (state, metrics).

Randomness is a function of the step alone, rng = fold_in(base_rng, step), so a resumed run
draws exactly what an uninterrupted one would, and nothing random lives in the checkpoint.
"""

import jax
import jax.numpy as jnp
import optax

from diffusion_jax import losses
from diffusion_jax import train_state as train_state_lib


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

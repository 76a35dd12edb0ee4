"""The training state: step, parameters, their EMA and the optimizer state."""

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far.
    params: dict
    ema_params: dict  # What sampling and evaluation use.
    opt_state: optax.OptState


def make_lr_schedule(optim_config):
    """Linear warm-up from 0 to the learning rate, then constant (the paper's schedule).

    With `lr_decay_steps` > 0 the rate instead follows a half cosine from the end of the warm-up
    down to 0 at step `lr_decay_steps`, and stays 0 after it (optax's warmup_cosine_decay). On
    the main job it gained nothing over the warmed-up EMA (docs/main_job.md).
    """
    lr, warmup = optim_config.learning_rate, optim_config.warmup_steps
    if optim_config.lr_decay_steps > 0:
        if optim_config.lr_decay_steps <= warmup:
            raise ValueError(f'optim.lr_decay_steps={optim_config.lr_decay_steps} must exceed '
                             f'optim.warmup_steps={warmup}: the decay starts after the warm-up')
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 0),
                                                  optim_config.lr_decay_steps, end_value=0.0)
    if warmup <= 0:
        return optax.constant_schedule(lr)
    return optax.linear_schedule(0.0, lr, warmup)


def make_optimizer(optim_config, *, clip=True):
    """Adam with the warm-up schedule, preceded by global-norm clipping when `clip`.

    Args:
      optim_config: the `optim` block of a config.
      clip: False when each replica already clipped its own gradient (shard_map mode with
        clip_per_replica, the original TPU behaviour).
    """
    adam = optax.adam(make_lr_schedule(optim_config), b1=optim_config.adam_b1,
                      b2=optim_config.adam_b2, eps=optim_config.adam_eps)
    if clip and optim_config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim_config.grad_clip), adam)
    return adam


def ema_decay(optim_config, step):
    """The EMA decay at `step`; with ema_warmup, min(decay, (1 + step) / (10 + step))."""
    decay = jnp.asarray(optim_config.ema_decay, jnp.float32)
    if optim_config.ema_warmup:
        step = jnp.asarray(step, jnp.float32)
        decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return decay


def create_train_state(params, optimizer):
    """A fresh state; the EMA starts from the initial parameters."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.tree.map(jnp.copy, params),
                      opt_state=optimizer.init(params))


def apply_gradients(state, grads, optimizer, optim_config):
    """One optimizer update, then the EMA update (optax.incremental_update is Polyak averaging)."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = optax.incremental_update(
        params, state.ema_params, 1.0 - ema_decay(optim_config, state.step))
    return TrainState(step=state.step + 1, params=params, ema_params=ema_params,
                      opt_state=opt_state)

"""Meshes, shardings, global batches and the two data-parallel train-step builders.

'jit': the step is `jax.jit` with `NamedSharding`s over a ("data",) mesh; XLA partitions the
  global-batch mean loss (the "pjit" mode).
'shard_map': each device computes its own loss and gradient on its slice of the batch, optionally
  clips it (the original TPU code clipped per replica before the cross-replica mean), and the
  gradients are averaged with an explicit `pmean`.
The two give the same update when clipping the averaged gradient; only this module knows meshes.
"""

import functools

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax import train_step as train_step_lib

DATA_AXIS = 'data'
PARALLEL_MODES = ('jit', 'shard_map')


def make_mesh(devices=None):
    """A 1-D ("data",) mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh):
    return NamedSharding(mesh, P())


def data_sharded(mesh):
    """The leading (batch) axis split over the data axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def state_shardings(abstract_state, mesh):
    """Shardings for every leaf of the train state: replicated (pure data parallelism)."""
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def check_global_batch(global_batch_size, mesh):
    num_devices = mesh.devices.size
    if global_batch_size % num_devices:
        raise ValueError(f'global batch size {global_batch_size} is not divisible by the '
                         f'{num_devices} devices of the mesh')


def make_global_batch(local_batch, mesh):
    """Global arrays sharded on the batch axis from this process's rows (numpy dict)."""
    sharding = data_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


def _clip_by_global_norm(grads, max_norm):
    clipped, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    return clipped


def shard_map_grad_fn(loss_fn, mesh, *, clip_norm=None):
    """(loss, metrics), grads of `loss_fn` computed per device and averaged with `pmean`.

    Args:
      loss_fn: (params, batch, t, noise, rng) -> (loss, metrics), a mean over its batch.
      mesh: the ("data",) mesh; the batch dict, t and noise are split over it, params replicated.
      clip_norm: if set, each device clips its own gradient to this global norm before the mean.
    """
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

    def per_device(params, batch, t, noise, rng):
        # Marking the parameters device-varying keeps each device's gradient its own; otherwise
        # shard_map would sum them implicitly and per-replica clipping could not be expressed.
        params = jax.lax.pcast(params, DATA_AXIS, to='varying')
        rng = jax.random.fold_in(rng, jax.lax.axis_index(DATA_AXIS))
        (loss, metrics), grads = value_and_grad(params, batch, t, noise, rng)
        if clip_norm:
            grads = _clip_by_global_norm(grads, clip_norm)
        return jax.lax.pmean(((loss, metrics), grads), DATA_AXIS)

    batch_spec = P(DATA_AXIS)
    return jax.shard_map(per_device, mesh=mesh,
                         in_specs=(P(), batch_spec, batch_spec, batch_spec, P()),
                         out_specs=P())


def build_train_step(*, loss_fn, optimizer, optim_config, process, mesh, shardings,
                     mode='jit', clip_per_replica=False):
    """The jitted, donating train step (state, batch, base_rng) -> (state, metrics).

    Args:
      loss_fn: see `shard_map_grad_fn`.
      optimizer: must not clip again when `clip_per_replica` (see `make_optimizer(clip=False)`).
      optim_config, process: passed to `train_step.train_step`.
      mesh: the ("data",) mesh.
      shardings: the train state's shardings (`state_shardings`).
      mode: 'jit' or 'shard_map'.
      clip_per_replica: shard_map only; clip each replica's gradient to optim_config.grad_clip.
    """
    if mode not in PARALLEL_MODES:
        raise ValueError(f'Unknown parallel mode {mode!r}; valid: {", ".join(PARALLEL_MODES)}')
    if clip_per_replica and mode != 'shard_map':
        raise ValueError("clip_per_replica needs training.parallel='shard_map'")
    if mode == 'jit':
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    else:
        grad_fn = shard_map_grad_fn(
            loss_fn, mesh, clip_norm=optim_config.grad_clip if clip_per_replica else None)
    step = functools.partial(train_step_lib.train_step, grad_fn=grad_fn, optimizer=optimizer,
                             optim_config=optim_config, process=process)
    return jax.jit(step, in_shardings=(shardings, data_sharded(mesh), replicated(mesh)),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=0)

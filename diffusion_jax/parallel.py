"""Meshes, shardings (incl. FSDP parameter sharding), global batches and the two train steps.

'jit': the step is `jax.jit` with `NamedSharding`s over a ("data",) mesh; XLA partitions the
  global-batch mean loss (the "pjit" mode).
'shard_map': each device computes its own loss and gradient on its slice of the batch, optionally
  clips it (the original TPU code clipped per replica before the cross-replica mean), and the
  gradients are averaged with an explicit `pmean`.
The two give the same update when clipping the averaged gradient; only this module knows meshes.

FSDP (ZeRO-3-like): `state_shardings(..., rules)` can split parameters, their EMA and the Adam
moments over the same ("data",) axis; under 'jit', XLA inserts the collectives (all-gathers of
the parameters where the step uses them). `OPTIMIZER_STATE_RULES` split the Adam moments only
(ZeRO-1-like: the update's slices are gathered, nothing else). Rules are data, a tuple of
(regex, spec) pairs:

  regex: `re.search`ed against the leaf's '/'-joined path in the state, e.g.
    'params/down_0_block_0/conv1/kernel', 'ema_params/...', 'opt_state/1/0/mu/.../kernel', so
    one rule shards a parameter, its EMA and its moments alike. The first matching rule wins;
    unmatched leaves and scalars (step, Adam's count) are replicated.
  spec: a comma-separated PartitionSpec aligned to the array's trailing axes: 'data' splits the
    last axis (the output channels of HWIO conv and (in, out) dense kernels), 'data,None' the
    second-to-last; 'None' or '' leaves an axis whole ('None' alone replicates: an exception
    placed before a broader rule).

A malformed rule raises ValueError naming it. A leaf whose chosen axis is not divisible by the
mesh axis size (or that has too few axes) stays replicated: one log line per call lists them.
'shard_map' takes replicated parameters: rules that split them need 'jit'.
"""

import functools
import logging
import re

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax import errors
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


# Every kernel (conv HWIO, dense IO) split on its output axis; biases and norm scales replicated.
# A kernel with too few outputs for the mesh (the 3-channel conv_out) falls back to replicated.
FSDP_RULES = ((r'(^|/)kernel$', DATA_AXIS),)
# ZeRO stage 1: only the Adam moments' kernels are split. The parameters and their EMA, which
# the forward pass and the samplers read, stay whole on every device, so no collective enters the
# forward pass; a replica holds two full copies of the network instead of four.
OPTIMIZER_STATE_RULES = ((r'^opt_state/.*kernel$', DATA_AXIS),)


def parse_rules(rules, axis_names=(DATA_AXIS,)):
    """[(compiled regex, spec entries)] from (regex, spec) pairs; ValueError naming a bad rule."""
    parsed = []
    for rule in rules or ():
        if not isinstance(rule, (tuple, list)) or len(rule) != 2:
            raise errors.ConfigError(f'sharding rule {rule!r} is not a (regex, spec) pair')
        pattern, spec = rule
        try:
            regex = re.compile(pattern)
        except (TypeError, re.error) as e:
            raise errors.ConfigError(f'sharding rule {rule!r}: bad regex: {e}') from None
        if not isinstance(spec, str):
            raise errors.ConfigError(f'sharding rule {rule!r}: the spec must be a string like '
                                     f'{DATA_AXIS!r} or "{DATA_AXIS},None"')
        entries = tuple(None if e.strip() in ('', 'None') else e.strip() for e in spec.split(','))
        named = [e for e in entries if e is not None]
        unknown = sorted(set(named) - set(axis_names))
        if unknown or len(named) != len(set(named)):
            raise errors.ConfigError(
                f'sharding rule {rule!r}: spec entries must be mesh axes '
                f'{tuple(axis_names)} (each at most once) or None; got {spec!r}')
        parsed.append((regex, entries))
    return parsed


def _leaf_spec(shape, entries, mesh):
    """The PartitionSpec of `entries` right-aligned to `shape`; None when it does not fit."""
    while entries and entries[0] is None:
        entries = entries[1:]  # Leading Nones never need an axis.
    if len(entries) > len(shape):
        return None
    aligned = (None,) * (len(shape) - len(entries)) + tuple(entries)
    if any(name is not None and size % mesh.shape[name]
           for size, name in zip(shape, aligned)):
        return None
    return P(*aligned) if any(aligned) else P()


def state_shardings(abstract_state, mesh, rules=()):
    """Shardings for every leaf of the train state (arrays or ShapeDtypeStructs).

    With no rules, everything is replicated (pure data parallelism); see the module docstring
    for `rules` (e.g. `FSDP_RULES`).
    """
    parsed = parse_rules(rules, mesh.axis_names)
    fallbacks = []

    def leaf_sharding(path, leaf):
        name = jax.tree_util.keystr(path, simple=True, separator='/')
        shape = np.shape(leaf)
        entries = next((e for regex, e in parsed if regex.search(name)), None)
        if not shape or entries is None:
            return replicated(mesh)
        spec = _leaf_spec(shape, entries, mesh)
        if spec is None:
            fallbacks.append(f'{name} {shape}')
            return replicated(mesh)
        return NamedSharding(mesh, spec)

    shardings = jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)
    if fallbacks:
        logging.info('Sharding rules: %d leaves replicated (axis not divisible by the mesh %s, '
                     'or too few axes): %s', len(fallbacks), dict(mesh.shape),
                     ', '.join(fallbacks))
    return shardings


def is_replicated(shardings):
    """Whether every sharding in the tree leaves every axis whole."""
    return all(not any(s.spec) for s in jax.tree.leaves(shardings))


def check_global_batch(global_batch_size, mesh, num_microbatches=1):
    num_devices = mesh.devices.size
    if global_batch_size % num_devices:
        raise errors.ConfigError(f'global batch size {global_batch_size} is not divisible by the '
                                 f'{num_devices} devices of the mesh')
    if num_microbatches < 1 or (global_batch_size // num_devices) % num_microbatches:
        raise errors.ConfigError(
            f'training.num_microbatches={num_microbatches} does not divide the '
            f'{global_batch_size // num_devices} images per device (global batch '
            f'{global_batch_size} over {num_devices} devices)')


def make_global_batch(local_batch, mesh):
    """Global arrays sharded on the batch axis from this process's rows (numpy dict)."""
    sharding = data_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


def _clip_by_global_norm(grads, max_norm):
    clipped, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    return clipped


def shard_map_grad_fn(loss_fn, mesh, *, clip_norm=None, num_microbatches=1):
    """(loss, metrics), grads of `loss_fn` computed per device and averaged with `pmean`.

    Args:
      loss_fn: (params, batch, t, noise, rng) -> (loss, metrics), a mean over its batch.
      mesh: the ("data",) mesh; the batch dict, t and noise are split over it, params replicated.
      clip_norm: if set, each device clips its own gradient to this global norm before the mean.
      num_microbatches: each device accumulates its gradient over this many microbatches of its
        rows (`train_step.accumulate_gradients`) before clipping and the mean.
    """
    value_and_grad = train_step_lib.accumulate_gradients(
        jax.value_and_grad(loss_fn, has_aux=True), num_microbatches)

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
                     mode='jit', clip_per_replica=False, skip_nonfinite=False,
                     num_microbatches=1):
    """The jitted, donating train step (state, batch, base_rng) -> (state, metrics).

    Args:
      loss_fn: see `shard_map_grad_fn`.
      optimizer: must not clip again when `clip_per_replica` (see `make_optimizer(clip=False)`).
      optim_config, process: passed to `train_step.train_step`.
      mesh: the ("data",) mesh.
      shardings: the train state's shardings (`state_shardings`); sharded parameters need
        'jit' (the EMA and optimizer state may be sharded in either mode: the update runs
        outside the shard_map).
      mode: 'jit' or 'shard_map'.
      clip_per_replica: shard_map only; clip each replica's gradient to optim_config.grad_clip.
      skip_nonfinite: drop non-finite updates (see `train_step.train_step`).
      num_microbatches: the gradient is accumulated over this many microbatches, each split
        over the devices like the batch (`train_step.accumulate_gradients`).
    """
    if mode not in PARALLEL_MODES:
        raise errors.ConfigError(
            f'Unknown parallel mode {mode!r}; valid: {", ".join(PARALLEL_MODES)}')
    if clip_per_replica and mode != 'shard_map':
        raise errors.ConfigError("clip_per_replica needs training.parallel='shard_map'")
    if mode == 'shard_map' and not is_replicated(shardings.params):
        raise errors.ConfigError(
            "sharded parameters (FSDP rules, training.param_sharding) need "
            "training.parallel='jit': shard_map takes replicated parameters "
            "(parallel.OPTIMIZER_STATE_RULES, which leave them whole, work in both)")
    if mode == 'jit':
        # Microbatch j is rows j, j + k, ... of the batch: [k, B / k] with the second axis
        # split over the devices keeps every row on the device that holds it.
        microbatch_sharding = NamedSharding(mesh, P(None, DATA_AXIS))
        grad_fn = train_step_lib.accumulate_gradients(
            jax.value_and_grad(loss_fn, has_aux=True), num_microbatches,
            constrain=lambda tree: jax.lax.with_sharding_constraint(tree, microbatch_sharding))
    else:
        grad_fn = shard_map_grad_fn(
            loss_fn, mesh, clip_norm=optim_config.grad_clip if clip_per_replica else None,
            num_microbatches=num_microbatches)
    step = functools.partial(train_step_lib.train_step, grad_fn=grad_fn, optimizer=optimizer,
                             optim_config=optim_config, process=process,
                             skip_nonfinite=skip_nonfinite)
    return jax.jit(step, in_shardings=(shardings, data_sharded(mesh), replicated(mesh)),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=0)

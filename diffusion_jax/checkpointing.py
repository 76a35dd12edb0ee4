"""Orbax checkpoints of the train state and the input pipeline's position, with integrity checks.

Orbax does not checksum array data (a flipped byte restores silently), so every save also stores
a 64-bit fingerprint of each array (`integrity`) and every restore recomputes and compares it. A
step that fails to restore, or whose arrays do not match their fingerprints, is reported by step
and array name, and the previous step is tried instead. A state with a non-finite array is never
saved.
"""

import errno
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorstore

from diffusion_jax import distributed
from diffusion_jax import errors


class CheckpointError(errors.UserError, RuntimeError):
    """A checkpoint cannot be used: corrupt, truncated or made for another model."""


def make_manager(workdir, *, keep, save_interval_steps=1):
    """An async `CheckpointManager` in `workdir/checkpoints` keeping the `keep` latest steps.

    Leftovers of a save interrupted by a crash (`*.orbax-checkpoint-tmp*`) are deleted on start:
    they were never committed, so no step is lost with them.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_interval_steps,
        enable_async_checkpointing=True, create=True, cleanup_tmp_directories=True)
    directory = os.path.join(workdir, 'checkpoints')
    if '://' not in directory:  # e.g. gs://: orbax opens those through etils.epath.
        directory = os.path.abspath(directory)
    handlers = dict(state=ocp.StandardCheckpointHandler(), data=ocp.JsonCheckpointHandler(),
                    integrity=ocp.JsonCheckpointHandler())
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def leaf_names(tree):
    """'/'-joined key paths of a tree's leaves (e.g. 'params/conv_in/kernel'), in
    `jax.tree.leaves` order; the names `parallel.state_shardings` rules match too."""
    return [jax.tree_util.keystr(path, simple=True, separator='/')
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _as_words(x):
    """The bits of an array as uint32 words (wider types split, narrower ones widened)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    itemsize = jnp.dtype(x.dtype).itemsize
    if itemsize == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if itemsize < 4:
        narrow = {1: jnp.uint8, 2: jnp.uint16}[itemsize]
        return jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., itemsize // 4]


def _fingerprint(x):
    """Two position-weighted sums of the words mod 2^32, and whether x is finite.

    The weights are odd, hence invertible mod 2^32: changing any single word always changes
    both sums; more changes go unnoticed with probability about 2^-64. Sums mod 2^32 do not depend
    on the order of addition, so the fingerprint is the same under every sharding and mesh.
    """
    words = _as_words(x)
    index = jnp.zeros(words.shape, jnp.uint32)  # The row-major position of each word.
    strides = np.cumprod((1,) + words.shape[:0:-1])[::-1] if words.ndim else ()
    for axis, stride in enumerate(strides):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(
            stride % 2**32)
    first = jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)
    second = jnp.sum((words ^ (words >> 15)) * (index * np.uint32(0x9E3779B1) | 1),
                     dtype=jnp.uint32)
    finite = (jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
              else jnp.bool_(True))
    return jnp.stack([first, second]), finite


# Jitted per array, so it compiles once per distinct shape and dtype (a few dozen in a U-Net)
# rather than as one program over the whole state.
_fingerprint_jit = jax.jit(_fingerprint)


def fingerprints(state):
    """({array name: 16 hex digits}, [names of arrays with a NaN or Inf]) of a state."""
    names = leaf_names(state)
    leaves = jax.tree.leaves(state)
    if all(getattr(x, 'is_fully_replicated', True) for x in leaves):
        # No collectives: dispatch every array's program, then wait once (a few hundred
        # synchronous round trips would cost about a second per save).
        results = jax.device_get([_fingerprint_jit(x) for x in leaves])
    else:
        # One array at a time: on XLA:CPU, programs dispatched together may run concurrently,
        # and the collectives of several of them (sharded arrays) can wait on each other forever.
        results = [jax.device_get(_fingerprint_jit(x)) for x in leaves]
    prints = {n: f'{int(h[0]):08x}{int(h[1]):08x}' for n, (h, _) in zip(names, results)}
    return prints, [n for n, (_, finite) in zip(names, results) if not finite]


def save(manager, step, state, data_state, *, force=False):
    """Saves (asynchronously) the state, the pipeline position and the state's fingerprints.

    Returns:
      Whether it saved (the manager's interval decides unless `force`).

    Raises:
      FloatingPointError: the state has a NaN or Inf; nothing is written.
    """
    if not (force or manager.should_save(step)):
        return False
    prints, non_finite = fingerprints(state)
    if non_finite:
        raise FloatingPointError(
            f'not saving step {step}: {non_finite[0]} (and {len(non_finite) - 1} more arrays) '
            f'is not finite; the last checkpoint ({manager.latest_step()}) is intact')
    return manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        integrity=ocp.args.JsonSave(prints)), force=True)


def _caused_by_full_disk(error):
    """Whether `error`, its causes or (for an exception group) its members are ENOSPC."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if 'No space left on device' in str(e):
            return True
        todo += [e.__cause__, e.__context__, *getattr(e, 'exceptions', ())]
    return False


def committed_steps(directory):
    """The steps whose checkpoint directory was committed (not a `*.orbax-checkpoint-tmp*`)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def disk_full_error(error, manager, *, needed_bytes=None):
    """A `errors.DiskFullError` for a save that failed for lack of space, else None.

    The half-written step stays until the next start removes it (`make_manager`): orbax's
    writers of the failed save may still be running, and deleting under them fails them again.
    """
    if not _caused_by_full_disk(error):
        return None
    directory = str(manager.directory)
    names = os.listdir(directory) if os.path.isdir(directory) else []
    unfinished = sorted(int(n.split('.')[0]) for n in names
                        if '.orbax-checkpoint-tmp' in n and n.split('.')[0].isdigit())
    step = f'step {unfinished[-1]}' if unfinished else 'a step'
    good = committed_steps(directory)
    free = shutil.disk_usage(directory).free if os.path.isdir(directory) else None
    needs = f'; a checkpoint takes about {needed_bytes / 2**20:.1f} MiB' if needed_bytes else ''
    has = f' ({free / 2**20:.1f} MiB free there{needs})' if free is not None else needs
    last = (f'the last good checkpoint is step {good[-1]}' if good
            else 'no checkpoint was saved yet')
    return errors.DiskFullError(
        f'no space left on device while saving the checkpoint of {step} to {directory}{has}; '
        f'{last}. Free some space and run the same command again to resume'
        f'{f" from step {good[-1]}" if good else ""}.')


def restore_latest(manager, abstract_state, *, quarantine_dir=None):
    """(state, data_state, step) from the newest good checkpoint, or None when there is none.

    A step that cannot be read or fails its fingerprints is logged as an error naming the step
    and array, then the previous step is tried; with `quarantine_dir`, the bad step is moved
    there (process 0) once an older step restores, so a resumed run can save that step again.

    Args:
      manager: from `make_manager`.
      abstract_state: the state's tree of `jax.ShapeDtypeStruct`s with shardings: the restore
        target, so a checkpoint lands directly on the current mesh.
      quarantine_dir: where to move bad steps (None: leave them).

    Raises:
      CheckpointError: checkpoints exist but none is usable, or they were written for a model
        of other parameter shapes (the message lists the differences).
    """
    problems, bad_steps = [], []
    for step in sorted(manager.all_steps(), reverse=True):
        check_compatible(manager, step, abstract_state)
        try:
            state, data_state = _restore_verified(manager, step, abstract_state)
        except CheckpointError as e:
            logging.error('%s; trying the previous checkpoint', e)
            problems.append(str(e))
            bad_steps.append(step)
            continue
        # Moved only once a good step is found: if none restores, the cause may not be the
        # files (e.g. a bug), so everything stays where the next attempt will look.
        for bad in bad_steps if quarantine_dir else ():
            _quarantine(manager, bad, quarantine_dir)
        logging.info('Restored checkpoint at step %d from %s', step, manager.directory)
        return state, data_state, step
    if problems:
        raise CheckpointError(f'no usable checkpoint in {manager.directory}: '
                              + '; '.join(problems))
    return None


def _restore_verified(manager, step, abstract_state):
    step_dir = os.path.join(str(manager.directory), str(step))
    has_prints = os.path.isdir(os.path.join(step_dir, 'integrity'))
    args = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    if has_prints:
        args['integrity'] = ocp.args.JsonRestore()
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - tensorstore and orbax raise many kinds.
        bad = _unreadable_arrays(step_dir)
        raise CheckpointError(
            f'checkpoint step {step} is corrupt or truncated: cannot read '
            f'{", ".join(bad) if bad else "its metadata"} ({type(e).__name__}: '
            f'{str(e).splitlines()[0][:200]})') from e
    if not has_prints:
        logging.warning('checkpoint step %d has no fingerprints (an older save): not verified',
                        step)
        return restored.state, restored.data
    actual, _ = fingerprints(restored.state)
    expected = restored.integrity
    bad = [name for name in actual if expected.get(name) != actual[name]]
    if bad:
        raise CheckpointError(
            f'checkpoint step {step} is corrupt: array {bad[0]} does not match its saved '
            f'fingerprint ({expected.get(bad[0])} saved, {actual[bad[0]]} read)'
            + (f', nor do {len(bad) - 1} more' if len(bad) > 1 else ''))
    return restored.state, restored.data


def _unreadable_arrays(step_dir):
    """Names of the arrays of a saved state that cannot be read back (a diagnosis).

    Reads each array straight from its tensorstore (orbax's own per-array restore costs about
    half a second per call on a whole U-Net tree; this takes about a millisecond per array).
    """
    path = os.path.abspath(os.path.join(step_dir, 'state'))
    try:
        metadata = ocp.PyTreeCheckpointer().metadata(path).item_metadata
    except Exception:  # noqa: BLE001 - the metadata itself is unreadable.
        return []
    driver = 'zarr3' if metadata.use_zarr3 else 'zarr'
    ocdbt = os.path.exists(os.path.join(path, 'manifest.ocdbt'))
    bad = []
    for name in leaf_names(metadata.tree):
        key = name.replace('/', '.')  # Orbax's name for the array's store.
        kvstore = ({'driver': 'ocdbt', 'base': f'file://{path}', 'path': key} if ocdbt
                   else {'driver': 'file', 'path': os.path.join(path, key)})
        try:
            tensorstore.open({'driver': driver, 'kvstore': kvstore}).result().read().result()
        except Exception:  # noqa: BLE001
            bad.append(name)
    return bad


def check_compatible(manager, step, abstract_state):
    """Raises CheckpointError listing the arrays whose saved shapes differ from the model's."""
    try:
        saved = manager.item_metadata(step).state
    except Exception:  # noqa: BLE001 - unreadable metadata is reported by the restore.
        return
    if saved is None:
        return

    def shapes(tree):
        return {n: tuple(x.shape) for n, x in zip(leaf_names(tree), jax.tree.leaves(tree))}
    saved_shapes, wanted = shapes(saved.tree), shapes(abstract_state)
    differ = [f'{n}: checkpoint {saved_shapes.get(n, "missing")}, model {shape}'
              for n, shape in wanted.items() if saved_shapes.get(n) != shape]
    extra = sorted(set(saved_shapes) - set(wanted))
    if differ or extra:
        lines = differ[:10] + [f'{n}: only in the checkpoint' for n in extra[:5]]
        raise CheckpointError(
            f'the checkpoint at step {step} in {manager.directory} was written for another '
            f'model config ({len(differ)} arrays differ, {len(extra)} extra): '
            + '; '.join(lines) + '. Use a new --workdir, or the config of that run '
            '(its config.json). Nothing was changed on disk.')


def _quarantine(manager, step, quarantine_dir):
    if jax.process_index() == 0:
        os.makedirs(quarantine_dir, exist_ok=True)
        target = os.path.join(quarantine_dir, str(step))
        if os.path.exists(target):
            shutil.rmtree(target)
        shutil.move(os.path.join(str(manager.directory), str(step)), target)
        logging.error('moved the bad checkpoint step %d to %s', step, target)
    distributed.barrier(f'quarantined checkpoint {step}')
    manager.reload()


def abstract_with_shardings(abstract_state, shardings):
    """Attach shardings to a tree of ShapeDtypeStructs (the orbax restore target)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_state, shardings)


def save_config(workdir, config):
    """Writes the resolved config as JSON next to the checkpoints (process 0 only)."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=str)


def load_config(workdir):
    """The config a run saved in `workdir/config.json` (lists back to tuples, as configs use)."""
    path = os.path.join(workdir, 'config.json')
    if not os.path.exists(path):
        raise errors.MissingInputError(
            f'{path} does not exist: is {workdir!r} the workdir of a run?')
    with open(path) as f:
        raw = json.load(f)

    def tuples(node):
        if isinstance(node, dict):
            return {k: tuples(v) for k, v in node.items()}
        return tuple(node) if isinstance(node, list) else node
    return ml_collections.ConfigDict(tuples(raw))

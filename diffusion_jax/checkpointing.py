"""Orbax checkpoints of the train state and the input pipeline's position."""

import json
import logging
import os

import jax
import ml_collections
import orbax.checkpoint as ocp


def make_manager(workdir, *, keep, save_interval_steps=1):
    """An async `CheckpointManager` in `workdir/checkpoints` keeping the `keep` latest steps."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_interval_steps,
        enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')),
                                 options=options, item_names=('state', 'data'))


def save(manager, step, state, data_state, *, force=False):
    """Saves (asynchronously) the state and the pipeline position; returns whether it saved."""
    return manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)


def restore_latest(manager, abstract_state):
    """(state, data_state, step) from the latest checkpoint, or None when there is none.

    Args:
      manager: from `make_manager`.
      abstract_state: the state's tree of `jax.ShapeDtypeStruct`s with shardings: the restore
        target, so a checkpoint lands directly on the current mesh.
    """
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    logging.info('Restored checkpoint at step %d from %s', step, manager.directory)
    return restored.state, restored.data, step


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
        raise FileNotFoundError(f'{path} does not exist: is {workdir!r} the workdir of a run?')
    with open(path) as f:
        raw = json.load(f)

    def tuples(node):
        if isinstance(node, dict):
            return {k: tuples(v) for k, v in node.items()}
        return tuple(node) if isinstance(node, list) else node
    return ml_collections.ConfigDict(tuples(raw))

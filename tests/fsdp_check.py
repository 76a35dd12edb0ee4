"""Run in subprocesses by tests/test_fsdp.py (fake CPU devices; see conftest.run_python).

    python tests/fsdp_check.py train OUT_DIR                 # 8 devices
    python tests/fsdp_check.py restore OUT_DIR NAME RULES    # any device count; RULES fsdp|none

train: the same tiny U-Net, initial parameters and batches trained for 3 steps on an 8-device
mesh with the state replicated (jit), with `parallel.FSDP_RULES` (jit, and again with the
batch run as 2 microbatches) and with `parallel.OPTIMIZER_STATE_RULES` (shard_map, whose
explicit pmean the rules must not disturb, also with 2 microbatches); writes the per-step losses
and gradient norms and every final state leaf to OUT_DIR/train.npz, each leaf's sharding to
OUT_DIR/train.json, and saves the FSDP state with orbax in OUT_DIR/workdir.
restore: restores that checkpoint onto a mesh of all this process's devices with the given rules
and writes the leaves to OUT_DIR/NAME.npz and their shardings to OUT_DIR/NAME.json.
"""

import json
import os
import sys

import jax
import numpy as np

from configs import tiny
from diffusion_jax import checkpointing, parallel, train, train_state

NUM_STEPS = 3
DATA_STATE = {'epoch': 1, 'position': 48}
RULES = {'fsdp': parallel.FSDP_RULES, 'none': ()}


def named_leaves(tree):
    """{'/'-joined path: leaf} of a tree (the same names `state_shardings` matches)."""
    return {jax.tree_util.keystr(path, simple=True, separator='/'): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def sharding_facts(state):
    """{leaf name: {spec, shape, shard_shape, num_devices}} of a state of global arrays."""
    return {name: {'spec': [None if e is None else str(e) for e in x.sharding.spec],
                   'shape': list(x.shape),
                   'shard_shape': list(x.addressable_shards[0].data.shape),
                   'num_devices': len(x.sharding.device_set)}
            for name, x in named_leaves(state).items()}


def write(out_dir, name, state, **extra):
    arrays = {k: np.asarray(v) for k, v in named_leaves(jax.device_get(state)).items()}
    np.savez(os.path.join(out_dir, f'{name}.npz'), **arrays)
    with open(os.path.join(out_dir, f'{name}.json'), 'w') as f:
        json.dump(dict(extra, shardings=sharding_facts(state)), f)


def make_parts(config):
    model = train.make_model(config)
    return model, train.make_diffusion(config.diffusion), train_state.make_optimizer(config.optim)


def abstract_state(config, model, optimizer):
    return jax.eval_shape(lambda rng: train_state.create_train_state(
        train.init_params(model, config, rng), optimizer), jax.random.key(0))


def random_params(abstract_params):
    """Host parameters of the model's shapes, drawn with NumPy (op-by-op `model.init` compiles
    for longer than the training): kernels N(0, 1/fan_in); biases and norm scales 0 and 1 plus
    N(0, 0.05^2), so no layer is zero and every gradient is non-trivial."""
    rng = np.random.default_rng(1)

    def draw(path, x):
        name = jax.tree_util.keystr(path, simple=True, separator='/')
        noise = rng.standard_normal(x.shape).astype(np.float32)
        if name.endswith('kernel'):
            return noise / np.sqrt(np.prod(x.shape[:-1]))
        return float(name.endswith('scale')) + 0.05 * noise
    return jax.tree_util.tree_map_with_path(draw, abstract_params)


def run_training(config, model, diffusion, optimizer, params, mesh, rules):
    state = train_state.create_train_state(params, optimizer)
    shardings = parallel.state_shardings(state, mesh, rules=rules)
    state = jax.device_put(state, shardings)
    step_fn = train.build_step(config, model, diffusion, optimizer, mesh, shardings)
    images = np.random.default_rng(0).uniform(-1, 1, (NUM_STEPS, 16, 8, 8, 1)).astype(np.float32)
    step_losses, grad_norms = [], []
    for i in range(NUM_STEPS):
        batch = parallel.make_global_batch({'image': images[i]}, mesh)
        state, metrics = step_fn(state, batch, jax.random.key(0))
        step_losses.append(float(metrics['loss']))
        grad_norms.append(float(metrics['grad_norm']))
    return state, np.asarray(step_losses), np.asarray(grad_norms)


def main_train(out_dir):
    assert jax.device_count() == 8, jax.devices()
    config = tiny.get_config()
    config.training.parallel = 'jit'
    model, diffusion, optimizer = make_parts(config)
    params = random_params(abstract_state(config, model, optimizer).params)
    mesh = parallel.make_mesh()
    results = {}
    microbatched = config.copy_and_resolve_references()
    microbatched.training.num_microbatches = 2  # One image per device per microbatch.
    shard_map = microbatched.copy_and_resolve_references()
    shard_map.training.parallel = 'shard_map'
    for name, rules, run_config in [('replicated', (), config),
                                    ('fsdp', parallel.FSDP_RULES, config),
                                    ('fsdp_microbatched', parallel.FSDP_RULES, microbatched),
                                    ('optimizer_state', parallel.OPTIMIZER_STATE_RULES, shard_map)]:
        state, step_losses, grad_norms = run_training(
            run_config, model, diffusion, optimizer, params, mesh, rules)
        results[name] = state
        write(out_dir, name, state, losses=step_losses.tolist(), grad_norms=grad_norms.tolist())
    init = named_leaves(train_state.create_train_state(params, optimizer))
    np.savez(os.path.join(out_dir, 'init.npz'), **{k: np.asarray(v) for k, v in init.items()})
    manager = checkpointing.make_manager(os.path.join(out_dir, 'workdir'), keep=1)
    checkpointing.save(manager, NUM_STEPS, results['fsdp'], DATA_STATE, force=True)
    manager.wait_until_finished()
    manager.close()


def main_restore(out_dir, name, rules):
    config = tiny.get_config()
    model, _, optimizer = make_parts(config)
    abstract = abstract_state(config, model, optimizer)
    mesh = parallel.make_mesh()
    shardings = parallel.state_shardings(abstract, mesh, rules=RULES[rules])
    manager = checkpointing.make_manager(os.path.join(out_dir, 'workdir'), keep=1)
    state, data_state, step = checkpointing.restore_latest(
        manager, checkpointing.abstract_with_shardings(abstract, shardings))
    manager.close()
    write(out_dir, name, state, data_state=data_state, step=int(step),
          device_count=jax.device_count())


if __name__ == '__main__':
    if sys.argv[1] == 'train':
        main_train(sys.argv[2])
    else:
        main_restore(*sys.argv[2:5])

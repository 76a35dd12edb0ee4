"""Run in a subprocess with 8 fake CPU devices by tests/test_parallel.py.

Trains the same tiny U-Net for a few steps on a 1-device mesh (jit), an 8-device mesh (jit) and
an 8-device mesh (shard_map), and computes per-replica-clipped gradients with shard_map next to
the per-slice gradients of one device; writes everything to the .npz named on the command line.
"""

import sys

import jax
import numpy as np

from configs import tiny
from diffusion_jax import losses, parallel, train, train_state

NUM_STEPS = 3


def run_training(config, mesh, mode):
    model = train.make_model(config)
    diffusion = train.make_diffusion(config.diffusion)
    optimizer = train_state.make_optimizer(config.optim)
    with jax.threefry_partitionable(False):
        params = train.init_params(model, config, jax.random.key(1))
    # Perturb so no layer is zero-initialised: every gradient is then non-trivial.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = treedef.unflatten([x + 0.05 * jax.random.normal(k, x.shape)
                                for x, k in zip(leaves, keys)])
    params = jax.device_get(params)  # A host copy: the device state is donated by the step.
    state = train_state.create_train_state(params, optimizer)
    shardings = parallel.state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    config.training.parallel = mode
    step_fn = train.build_step(config, model, diffusion, optimizer, mesh, shardings)
    images = np.random.default_rng(0).uniform(-1, 1, (NUM_STEPS, 16, 8, 8, 1)).astype(np.float32)
    step_losses = []
    for i in range(NUM_STEPS):
        batch = parallel.make_global_batch({'image': images[i]}, mesh)
        state, metrics = step_fn(state, batch, jax.random.key(0))
        step_losses.append(float(metrics['loss']))
    return np.asarray(step_losses), jax.device_get(state.params), model, diffusion, params


def per_replica_clipping(config, model, diffusion, params, clip_norm):
    """shard_map gradients with per-replica clipping, and the 8 per-slice gradients."""
    mesh = parallel.make_mesh()
    loss_fn = losses.make_diffusion_loss(model, diffusion)
    rng = np.random.default_rng(1)
    x0 = rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32)
    t = rng.integers(0, diffusion.num_timesteps, 16).astype(np.int32)
    noise = rng.standard_normal((16, 8, 8, 1)).astype(np.float32)
    grad_fn = jax.jit(parallel.shard_map_grad_fn(loss_fn, mesh, clip_norm=clip_norm))
    (loss, _), grads = grad_fn(params, {'image': x0}, t, noise, jax.random.key(3))
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    slices = [value_and_grad(params, {'image': x0[2 * i:2 * i + 2]}, t[2 * i:2 * i + 2],
                             noise[2 * i:2 * i + 2], jax.random.key(3))
              for i in range(8)]
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
    return (float(loss), flat(grads), np.stack([float(s[0][0]) for s in slices]),
            np.stack([flat(s[1]) for s in slices]))


def main(out_path):
    assert jax.device_count() == 8, jax.devices()
    config = tiny.get_config()
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
    results = {}
    for name, devices, mode in [('jit_1', jax.devices()[:1], 'jit'),
                                ('jit_8', jax.devices(), 'jit'),
                                ('shard_map_8', jax.devices(), 'shard_map')]:
        step_losses, params, model, diffusion, init_params = run_training(
            config, parallel.make_mesh(devices), mode)
        results[f'{name}_losses'] = step_losses
        results[f'{name}_params'] = flat(params)
    loss, grads, slice_losses, slice_grads = per_replica_clipping(
        config, model, diffusion, init_params, clip_norm=0.05)
    results.update(clip_loss=loss, clip_grads=grads, slice_losses=slice_losses,
                   slice_grads=slice_grads)
    np.savez(out_path, **results)


if __name__ == '__main__':
    main(sys.argv[1])

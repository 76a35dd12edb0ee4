"""Gradient accumulation (`train_step.accumulate_gradients`): microbatches split as the batch's
devices hold them, and the accumulated loss and gradient equal the whole batch's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import parallel
from diffusion_jax import train_step


def test_microbatch_j_holds_rows_j_j_plus_k_and_so_on():
    x = np.random.default_rng(0).standard_normal((12, 3, 2))
    labels = np.arange(12)
    split_x, split_labels = train_step.split_microbatches((x, labels), 3)
    assert split_x.shape == (3, 4, 3, 2)
    for j in range(3):
        np.testing.assert_array_equal(split_x[j], x[j::3])
        np.testing.assert_array_equal(split_labels[j], labels[j::3])
    # Over 2 devices holding rows 0-5 and 6-11, every microbatch's first half is device 0's.
    assert set(np.asarray(split_labels[:, :2]).ravel()) == set(range(6))


def regression_loss(params, batch, t, noise, rng):
    """A mean over the batch that uses every input (t, noise, the key) and has two metrics."""
    pred = jnp.tanh(batch['image'] @ params['w'] + params['b'])
    err = (pred - batch['target'] - 0.1 * noise) ** 2 * (1 + t[:, None])
    loss = jnp.mean(err) + 0.0 * jax.random.uniform(rng)
    return loss, {'loss': loss, 'max_t': jnp.mean(t.astype(jnp.float32))}


def problem(batch_size=24, seed=0):
    rng = np.random.default_rng(seed)
    params = {'w': rng.standard_normal((5, 3)).astype(np.float32),
              'b': rng.standard_normal(3).astype(np.float32)}
    batch = {'image': rng.standard_normal((batch_size, 5)).astype(np.float32),
             'target': rng.standard_normal((batch_size, 3)).astype(np.float32)}
    t = rng.integers(0, 10, batch_size).astype(np.int32)
    noise = rng.standard_normal((batch_size, 3)).astype(np.float32)
    return params, batch, t, noise


def numpy_gradient(params, batch, t, noise):
    """Float64 NumPy value and gradient of `regression_loss` over the whole batch."""
    x, y = (np.float64(batch[k]) for k in ('image', 'target'))
    w, b = np.float64(params['w']), np.float64(params['b'])
    weight = (1 + t[:, None]).astype(np.float64)
    pred = np.tanh(x @ w + b)
    residual = pred - y - 0.1 * noise
    loss = np.mean(residual ** 2 * weight)
    d_pre = 2 * residual * weight * (1 - pred ** 2) / residual.size
    return loss, {'w': x.T @ d_pre, 'b': d_pre.sum(0)}


@pytest.mark.parametrize('num_microbatches', [1, 2, 3, 8])
def test_accumulated_loss_and_gradient_equal_the_whole_batch(num_microbatches):
    params, batch, t, noise = problem()
    grad_fn = train_step.accumulate_gradients(
        jax.value_and_grad(regression_loss, has_aux=True), num_microbatches)
    (loss, metrics), grads = jax.jit(grad_fn)(params, batch, t, noise, jax.random.key(0))
    want_loss, want_grads = numpy_gradient(params, batch, t, noise)
    np.testing.assert_allclose(loss, want_loss, rtol=2e-6)
    np.testing.assert_allclose(metrics['loss'], want_loss, rtol=2e-6)
    np.testing.assert_allclose(metrics['max_t'], t.mean(), rtol=2e-6)
    for name in ('w', 'b'):
        np.testing.assert_allclose(grads[name], want_grads[name], rtol=1e-5,
                                   atol=1e-6 * np.abs(want_grads[name]).max())


def test_each_microbatch_gets_its_own_key():
    def key_loss(params, batch, t, noise, rng):
        loss = params * jax.random.uniform(rng)
        return loss, {'loss': loss}

    inputs = (jnp.float32(1.0), {'image': jnp.zeros((4, 1))}, jnp.zeros(4), jnp.zeros((4, 1)))
    rng = jax.random.key(3)
    (_, _), grad = train_step.accumulate_gradients(
        jax.value_and_grad(key_loss, has_aux=True), 2)(*inputs, rng)
    want = np.mean([jax.random.uniform(jax.random.fold_in(rng, j)) for j in range(2)])
    np.testing.assert_allclose(grad, want, rtol=1e-6)


def test_bad_microbatch_counts_are_named():
    grad_fn = train_step.accumulate_gradients(
        jax.value_and_grad(regression_loss, has_aux=True), 5)
    with pytest.raises(ValueError, match='batch of 24 rows does not split into 5 microbatches'):
        grad_fn(*problem(), jax.random.key(0))
    with pytest.raises(ValueError, match='num_microbatches must be >= 1'):
        train_step.accumulate_gradients(regression_loss, 0)
    fake_mesh = type('Mesh', (), {'devices': np.zeros(2)})()
    parallel.check_global_batch(32, fake_mesh, 4)
    with pytest.raises(ValueError, match='num_microbatches=3 does not divide the 16 images'):
        parallel.check_global_batch(32, fake_mesh, 3)

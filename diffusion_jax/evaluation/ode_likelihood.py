"""Exact log-likelihoods under the probability flow ODE (Song et al. 2021, §4.3 and App. D.2).

For the ODE dx/dt = f̃(x, t), the instantaneous change of variables gives

  log p_ε(x(ε)) = log p_T(x(T)) + ∫_ε^T ∇·f̃(x(t), t) dt,

solved jointly with x(t) from ε up to T = 1. The divergence is either exact (a Jacobian-vector
product per input dimension: for low-dimensional data) or the Hutchinson-Skilling estimate
E_v[vᵀ (∂f̃/∂x) v] with one Rademacher or Gaussian probe v per sample held fixed over the solve
(an unbiased estimate of the log-likelihood, as in FFJORD and Song et al.).

Bits/dim of 8-bit images (dequantization): a pixel k ∈ {0..255} becomes v = (k + u) / 256 with
u ~ U[0, 1), mapped to the model's range as x = 2v - 1. A density p_x on [-1, 1]^D gives the
density 2^D p_x on [0, 1]^D, and log P(k) ≥ E_u[log p_v(v)] - D log 256, so

  bits/dim = -log p_x(x) / (D ln 2) - 1 + 8 = -log p_x(x) / (D ln 2) + 7,

an upper bound on the discrete negative log-likelihood (the "offset 7" of Song et al.'s code).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from diffusion_jax.sampling import ode

DIVERGENCES = ('hutchinson', 'exact')
PROBES = ('rademacher', 'gaussian')


def _flat_dot(a, b):
    return jnp.sum((a * b).reshape(a.shape[0], -1), axis=-1)


def divergence(fn, x, *, method='hutchinson', probe=None):
    """(fn(x), ∇·fn(x) per sample) for fn mapping [B, ...] to [B, ...] sample-wise."""
    if method == 'hutchinson':
        out, jv = jax.jvp(fn, (x,), (probe,))
        return out, _flat_dot(jv, probe)
    if method == 'exact':
        dim = math.prod(x.shape[1:])
        basis = jnp.eye(dim, dtype=x.dtype).reshape((dim, 1) + x.shape[1:])
        out, jvp_fn = jax.linearize(fn, x)
        diag = jax.vmap(lambda e: _flat_dot(jvp_fn(jnp.broadcast_to(e, x.shape)), e))(basis)
        return out, jnp.sum(diag, axis=0)
    raise ValueError(f'Unknown divergence {method!r}; valid: {", ".join(DIVERGENCES)}')


def _probe(rng, shape, kind):
    if kind == 'rademacher':
        return jax.random.rademacher(rng, shape, jnp.float32)
    if kind == 'gaussian':
        return jax.random.normal(rng, shape, jnp.float32)
    raise ValueError(f'Unknown probe {kind!r}; valid: {", ".join(PROBES)}')


@functools.partial(jax.jit, static_argnames=('model_apply', 'sde', 'rtol', 'atol', 'solver',
                                             'method', 'probe'))
def log_likelihood(model_apply, params, sde, x, rng, *, rtol=1e-5, atol=1e-5, solver='tsit5',
                   method='hutchinson', probe='rademacher'):
    """log p(x) (nats, per sample) of data x = x(ε) under the probability flow ODE.

    Returns:
      (log p [B], the latent x(T), the number of solver steps).
    """
    v = _probe(rng, x.shape, probe) if method == 'hutchinson' else None

    def vector_field(t, state):
        y, _ = state
        drift, div = divergence(
            lambda y: ode.probability_flow_drift(model_apply, params, sde, y, t), y,
            method=method, probe=v)
        return drift, div

    (z, delta), num_steps = ode.solve(vector_field, (x, jnp.zeros((x.shape[0],), jnp.float32)),
                                      sde.sample_eps, sde.T, rtol=rtol, atol=atol, solver=solver)
    return sde.prior_logp(z) + delta, z, num_steps


def dequantize(images, rng):
    """uint8 [N, H, W, C] -> x = 2 (k + u) / 256 - 1, u ~ U[0, 1) (the module docstring)."""
    u = jax.random.uniform(rng, images.shape, jnp.float32)
    return 2.0 * (jnp.asarray(images, jnp.float32) + u) / 256.0 - 1.0


def bits_per_dim(model_apply, params, sde, images, rng, *, batch_size, rtol=1e-5, atol=1e-5,
                 solver='tsit5', probe='rademacher', sharding=None, progress=True):
    """Dequantized bits/dim of uint8 images under the probability flow ODE (Hutchinson).

    Returns:
      dict with 'bpd' [N] (per image), 'log_likelihood' [N] (nats, of the [-1, 1] data) and
      'solver_steps' (per batch).
    """
    dims = math.prod(images.shape[1:])
    bpd, logps, steps = [], [], []
    for b, start in enumerate(tqdm(range(0, len(images), batch_size), desc='ODE likelihood',
                                   unit='batch', disable=not progress)):
        dequant_rng, probe_rng = jax.random.split(jax.random.fold_in(rng, b))
        x = dequantize(images[start:start + batch_size], dequant_rng)
        if sharding is not None and len(x) % sharding.mesh.devices.size == 0:
            x = jax.device_put(x, sharding)
        logp, _, num_steps = log_likelihood(model_apply, params, sde, x, probe_rng, rtol=rtol,
                                            atol=atol, solver=solver, probe=probe)
        logp = np.asarray(jax.device_get(logp), np.float64)
        logps.append(logp)
        bpd.append(-logp / (dims * np.log(2.0)) + 7.0)
        steps.append(int(num_steps))
    return dict(bpd=np.concatenate(bpd), log_likelihood=np.concatenate(logps),
                solver_steps=np.asarray(steps))

"""Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) for an NCSN.

For each noise level σ_i, i = 1 .. L, with step size α_i = ε σ_i² / σ_L², run n steps of

  x ← x + (α_i / 2) s_θ(x, σ_i) + sqrt(α_i) z,                                   (NCSN eq. 4)

starting from uniform noise on the data range [-1, 1]. With `denoise`, a last step
x ← x + σ_L² s_θ(x, σ_L) removes the remaining σ_L noise (Tweedie's formula; Jolicoeur-Martineau
et al. 2021, used by NCSNv2).

Noise: x_0 = uniform(fold_in(rng, L n)); step k (= level · n + inner step) draws fold_in(rng, k),
so chunking changes nothing.
"""

import functools

import jax
import jax.numpy as jnp

from diffusion_jax import sde as sde_lib
from diffusion_jax.sampling.ancestral import run_chunked


@functools.partial(jax.jit, static_argnames=('model_apply', 'ncsn', 'num_steps', 'n_steps_each'))
def langevin_steps(model_apply, params, ncsn, x, rng, first, *, num_steps, n_steps_each,
                   step_lr):
    """Langevin steps first .. first + num_steps - 1 of the annealed schedule:
    (x, x̂_0 = x + σ² s, the denoised x at the last step)."""
    sigmas = jnp.asarray(ncsn.sigmas(), jnp.float32)

    def step(carry, k):
        x, _ = carry
        level = jnp.full((x.shape[0],), k // n_steps_each, jnp.int32)
        sigma = sigmas[k // n_steps_each]
        alpha = step_lr * jnp.square(sigma / sigmas[-1])
        score = sde_lib.score(model_apply, params, ncsn, x, level)
        z = jax.random.normal(jax.random.fold_in(rng, k), x.shape, x.dtype)
        return (x + 0.5 * alpha * score + jnp.sqrt(alpha) * z, x + jnp.square(sigma) * score), None

    (x, denoised), _ = jax.lax.scan(step, (x, x), first + jnp.arange(num_steps, dtype=jnp.int32))
    return x, denoised


@functools.partial(jax.jit, static_argnames=('model_apply', 'ncsn'))
def _denoise(model_apply, params, ncsn, x):
    level = jnp.full((x.shape[0],), ncsn.num_scales - 1, jnp.int32)
    return x + float(ncsn.sigmas()[-1]) ** 2 * sde_lib.score(model_apply, params, ncsn, x, level)


def annealed_langevin_sample(model_apply, params, ncsn, rng, shape, *, n_steps_each=100,
                             step_lr=2e-5, denoise=True, chunk_size=None, progress=False,
                             sharding=None):
    """Samples by annealed Langevin dynamics.

    Args:
      model_apply: (params, x, label) -> ε output; static (reuse one function object).
      params: the (EMA) parameters.
      ncsn: `sde.NCSN` (its σ levels).
      rng: key.
      shape: [B, H, W, C].
      n_steps_each: Langevin steps per noise level (T in the paper).
      step_lr: ε of α_i = ε σ_i² / σ_L².
      denoise: finish with x + σ_L² s_θ(x, σ_L).
      chunk_size: steps per jitted call (None: one scan over all L · n steps).
      progress, sharding: as in `ancestral_sample`.

    Returns:
      (x, float32 [B, H, W, C]; snapshots of x + σ² s at the last step of each chunk).
    """
    total = ncsn.num_scales * n_steps_each
    x = jax.random.uniform(jax.random.fold_in(rng, total), shape, jnp.float32, -1.0, 1.0)
    if sharding is not None:
        x = jax.device_put(x, sharding)

    def run_chunk(x, start, num_steps):
        return langevin_steps(model_apply, params, ncsn, x, rng, jnp.int32(start),
                              num_steps=num_steps, n_steps_each=n_steps_each, step_lr=step_lr)

    x, snapshots = run_chunked(run_chunk, x, total, chunk_size, progress=progress,
                               desc='annealed Langevin')
    if denoise:
        x = _denoise(model_apply, params, ncsn, x)
    return x, snapshots

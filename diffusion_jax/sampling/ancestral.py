"""The 1000-step ancestral sampler of Algorithm 2 as a jitted `lax.scan`.

The reverse chain can run as one scan or as several jitted chunks of the same scan (for a
progress bar and x̂_0 snapshots); both draw the noise of step t from fold_in(rng, t) and x_T from
fold_in(rng, T), so they give the same samples bit for bit.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm


@functools.partial(jax.jit, static_argnames=('model_apply', 'num_steps', 'clip_denoised',
                                             'guidance_fn'))
def reverse_steps(model_apply, params, diffusion, x_t, rng, t_start, *, num_steps,
                  clip_denoised=True, guidance_fn=None, known=None):
    """Runs `num_steps` ancestral steps from x_{t_start} down to x_{t_start - num_steps}.

    Args:
      model_apply: (params, x, t) -> model output; static, so reuse one function object.
      params: the network's parameters (any pytree `model_apply` takes).
      diffusion: `Diffusion`.
      x_t: [B, H, W, C] at time t_start.
      rng: the sampling key.
      t_start: int scalar (traced, so chunks of equal length share one compilation).
      num_steps: reverse steps to run.
      clip_denoised: clip x̂_0 to [-1, 1].
      guidance_fn: optional (params, x, t) -> g, the classifier guidance added as μ + Σ g.
      known: optional dict(image=x_0 of the known pixels, mask=1 where known) (SDEdit with a
        mask): after each step to x_{t-1} the known pixels are replaced by a fresh draw of
        q(x_{t-1} | x_0), and by x_0 itself after the last step.

    Returns:
      (x after the last step, x̂_0 predicted at the last step).
    """
    def step(carry, i):
        x, _ = carry
        t_scalar = t_start - i
        t = jnp.full((x.shape[0],), t_scalar, dtype=jnp.int32)
        step_rng = jax.random.fold_in(rng, t_scalar)
        noise = jax.random.normal(step_rng, x.shape, x.dtype)
        guidance = None if guidance_fn is None else guidance_fn(params, x, t)
        x, pred_x0 = diffusion.p_sample(model_apply(params, x, t), x, t, noise, clip_denoised,
                                        guidance)
        if known is not None:
            noised = diffusion.q_sample(known['image'], jnp.maximum(t - 1, 0),
                                        jax.random.normal(jax.random.fold_in(step_rng, 1),
                                                          x.shape, x.dtype))
            x = keep_known(x, known, jnp.where(t_scalar > 0, noised, known['image']))
        return (x, pred_x0), None

    (x, pred_x0), _ = jax.lax.scan(step, (x_t, jnp.zeros_like(x_t)),
                                   jnp.arange(num_steps, dtype=jnp.int32))
    return x, pred_x0


def keep_known(x, known, known_at_level):
    """x with the pixels where known['mask'] is 1 replaced by `known_at_level`."""
    return known['mask'] * known_at_level + (1.0 - known['mask']) * x


def ancestral_sample(model_apply, params, diffusion, rng, shape, *, clip_denoised=True,
                     chunk_size=None, progress=False, sharding=None, guidance_fn=None):
    """Samples x_0 ~ p_θ by running the reverse process from x_T ~ N(0, I) (Algorithm 2).

    Args:
      model_apply: (params, x, t) -> model output.
      params: parameters (the EMA weights for the paper's results).
      diffusion: `Diffusion`.
      rng: key; x_T comes from fold_in(rng, T), the noise of step t from fold_in(rng, t).
      shape: [B, H, W, C].
      clip_denoised: clip x̂_0 to [-1, 1] before forming the mean (as the paper does).
      chunk_size: reverse steps per jitted call (None: one scan over all T steps).
      progress: show a tqdm bar advancing per chunk.
      sharding: optional sharding of x (e.g. batch split over a data mesh).
      guidance_fn: optional classifier guidance (see `reverse_steps`).

    Returns:
      (x_0 as float32 [B, H, W, C] in about [-1, 1],
       x̂_0 snapshots [num_chunks, B, H, W, C]: the prediction at the last step of each chunk).
    """
    x = jax.random.normal(jax.random.fold_in(rng, diffusion.num_timesteps), shape, jnp.float32)
    if sharding is not None:
        x = jax.device_put(x, sharding)
    return reverse_chain(model_apply, params, diffusion, x, rng,
                         t_start=diffusion.num_timesteps - 1, clip_denoised=clip_denoised,
                         chunk_size=chunk_size, progress=progress, guidance_fn=guidance_fn)


def reverse_chain(model_apply, params, diffusion, x_t, rng, *, t_start, clip_denoised=True,
                  chunk_size=None, progress=False, guidance_fn=None, known=None):
    """Runs the reverse process from x_t at time `t_start` down to x_0 in jitted chunks.

    The sampler starts it at x_T; interpolation (paper Fig. 8) and editing start it from a
    noised image at an intermediate t. Arguments as in `ancestral_sample` and `reverse_steps`.

    Returns:
      (x_0, x̂_0 snapshots at the last step of each chunk).
    """
    def run_chunk(x, start, num_steps):
        return reverse_steps(model_apply, params, diffusion, x, rng, jnp.int32(t_start - start),
                             num_steps=num_steps, clip_denoised=clip_denoised,
                             guidance_fn=guidance_fn, known=known)

    return run_chunked(run_chunk, x_t, t_start + 1, chunk_size, progress=progress,
                       desc='sampling')


def run_chunked(run_chunk, x, total, chunk_size, *, progress, desc):
    """Runs `total` steps as jitted calls of at most `chunk_size` (None: one call).

    Args:
      run_chunk: (x, first step index, number of steps) -> (x, x̂_0 of the chunk's last step).
      x: the starting state.
      total, chunk_size: steps in all and per call.
      progress, desc: a tqdm bar advancing per chunk.

    Returns:
      (x after the last step, x̂_0 snapshots stacked over the chunks).
    """
    chunk_size = total if chunk_size is None else chunk_size
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0:
        raise ValueError(f'chunk_size must be a positive integer, got {chunk_size!r}')
    snapshots = []
    with tqdm(total=total, desc=desc, unit='step', disable=not progress) as bar:
        for start in range(0, total, chunk_size):
            num_steps = min(chunk_size, total - start)
            x, pred_x0 = run_chunk(x, start, num_steps)
            snapshots.append(pred_x0)
            if progress:  # Dispatch is asynchronous: wait, so the bar shows real progress.
                x.block_until_ready()
            bar.update(num_steps)
    return x, jnp.stack(snapshots)


def snapshot_timesteps(num_timesteps, chunk_size):
    """The t at which each x̂_0 snapshot of `ancestral_sample` was taken."""
    starts = np.arange(num_timesteps - 1, -1, -chunk_size)
    return np.maximum(starts - chunk_size + 1, 0)

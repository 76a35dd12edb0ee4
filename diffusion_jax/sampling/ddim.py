"""DDIM (Song, Meng & Ermon 2021): sampling on a subsequence of timesteps, and deterministic
encoding (inversion) of images to x_T.

One step from level t to level s < t (s = -1 is the data, ᾱ_{-1} = 1), DDIM eq. 12:

  x_s = sqrt(ᾱ_s) x̂_0 + sqrt(1 - ᾱ_s - σ²) ε̂ + σ z,
  σ = η sqrt((1 - ᾱ_s) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_s)                  (DDIM eq. 16),

with x̂_0 from the network (clipped like the ancestral sampler's) and ε̂ the noise that maps x_t to
x̂_0. η = 0 is the deterministic DDIM, η = 1 over all T steps is Algorithm 2 of Ho et al. with the
β̃ (fixedsmall) variance. Noise follows the ancestral sampler's contract: x_T = normal(fold_in(rng,
T)) and the z of the step from t is normal(fold_in(rng, t)).

The per-step coefficients are computed on the host in float64 from the betas (1 - ᾱ_t / ᾱ_s is a
product of α's close to 1, which float32 ratios of ᾱ would round to a few digits).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.sampling.ancestral import run_chunked

SPACINGS = ('leading', 'trailing')


def timestep_sequence(num_timesteps, num_steps, spacing='leading'):
    """The increasing timesteps a `num_steps`-step sampler visits.

    Args:
      num_timesteps: T of the trained process.
      num_steps: steps of the sampler, 1 <= num_steps <= T.
      spacing: 'leading' (the DDIM paper's 0, k, 2k, ... with k = T // num_steps), 'trailing'
        (ends at T - 1: round(T - i T / num_steps) - 1), or IDDPM section counts such as
        '10,10,10' (T split into equal sections, that many evenly spaced steps in each; the
        counts must add up to num_steps).

    Returns:
      int32 array of `num_steps` distinct timesteps in [0, T), increasing.
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f'num_steps must be in [1, {num_timesteps}], got {num_steps}')
    if spacing == 'leading':
        steps = np.arange(num_steps) * (num_timesteps // num_steps)
    elif spacing == 'trailing':
        steps = np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps))[::-1] - 1
    else:
        steps = _section_steps(num_timesteps, num_steps, spacing)
    return np.asarray(steps, np.int32)


def _section_steps(num_timesteps, num_steps, spacing):
    try:
        counts = [int(c) for c in spacing.split(',')]
    except ValueError:
        raise ValueError(f"Unknown timestep spacing {spacing!r}; valid: {', '.join(SPACINGS)} or "
                         "comma-separated section counts such as '10,10,10'") from None
    if sum(counts) != num_steps or min(counts) < 1:
        raise ValueError(f'section counts {counts} must be positive and add up to '
                         f'num_steps={num_steps}')
    sizes = np.full(len(counts), num_timesteps // len(counts))
    sizes[:num_timesteps % len(counts)] += 1  # The first sections take the remainder.
    steps, start = [], 0
    for count, size in zip(counts, sizes):
        if count > size:
            raise ValueError(f'cannot take {count} steps from a section of {size} timesteps')
        stride = (size - 1) / (count - 1) if count > 1 else 1
        steps += [start + round(i * stride) for i in range(count)]
        start += size
    return steps


def step_coefficients(diffusion, from_levels, to_levels, eta):
    """float64 (sqrt(ᾱ_s), sqrt(1 - ᾱ_s - σ²), σ) of each step from level t to level s."""
    betas = np.asarray(jax.device_get(diffusion.betas), np.float64)
    # log ᾱ, with level -1 (the data) at log 1 = 0; 1 - ᾱ_t / ᾱ_s = -expm1(log ᾱ_t - log ᾱ_s)
    # keeps its digits where a ratio of two rounded products would not.
    log_alpha_bar = np.concatenate([[0.0], np.cumsum(np.log1p(-betas))])
    log_ab_t = log_alpha_bar[np.maximum(np.asarray(from_levels), 0) + 1]
    log_ab_s = log_alpha_bar[np.asarray(to_levels) + 1]
    one_minus_ab_t, one_minus_ab_s = -np.expm1(log_ab_t), -np.expm1(log_ab_s)
    one_minus_ratio = np.maximum(-np.expm1(log_ab_t - log_ab_s), 0.0)
    sigma = eta * np.sqrt(one_minus_ab_s / one_minus_ab_t * one_minus_ratio)
    eps_coef = np.sqrt(np.maximum(one_minus_ab_s - sigma ** 2, 0.0))
    return np.exp(0.5 * log_ab_s), eps_coef, sigma


@functools.partial(jax.jit, static_argnames=('model_apply', 'clip_denoised', 'guidance_fn'))
def ddim_steps(model_apply, params, diffusion, x, rng, steps, *, clip_denoised=True,
               guidance_fn=None):
    """Runs DDIM steps as one `lax.scan`.

    Args:
      model_apply: (params, x, t) -> model output; static.
      params: network parameters.
      diffusion: `Diffusion`.
      x: [B, H, W, C] at the first step's level.
      rng: sampling key (noise of the step from t is normal(fold_in(rng, t))).
      steps: dict of arrays [K]: `t` (int32, where the network is evaluated and x̂_0 / ε̂ are
        formed; level -1 evaluates at 0), `sqrt_alpha_bar_to`, `eps_coef`, `sigma` (float32).
      clip_denoised: clip x̂_0 to [-1, 1].
      guidance_fn: optional (params, x, t) -> g = s ∇ log p(y | x_t): the noise becomes
        ε̂ - sqrt(1 - ᾱ_t) g and x̂_0 is re-derived from it (Dhariwal & Nichol 2021,
        Algorithm 2, whose code does not clip that x̂_0 again).

    Returns:
      (x after the last step, x̂_0 of the last step).
    """
    def step(carry, s):
        x, _ = carry
        t = jnp.full((x.shape[0],), jnp.maximum(s['t'], 0), jnp.int32)
        out = diffusion.p_mean_variance(model_apply(params, x, t), x, t, clip_denoised)
        eps = diffusion.predict_eps_from_x0(x, t, out['pred_x0'])
        if guidance_fn is not None:
            eps = eps - diffusion.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1) * (
                guidance_fn(params, x, t))
            out['pred_x0'] = diffusion.predict_x0_from_eps(x, t, eps)
        noise = jax.random.normal(jax.random.fold_in(rng, s['t']), x.shape, x.dtype)
        x = s['sqrt_alpha_bar_to'] * out['pred_x0'] + s['eps_coef'] * eps + s['sigma'] * noise
        return (x, out['pred_x0']), None

    (x, pred_x0), _ = jax.lax.scan(step, (x, jnp.zeros_like(x)), steps)
    return x, pred_x0


def _run(model_apply, params, diffusion, x, rng, from_levels, to_levels, eta, clip_denoised,
         chunk_size, progress, desc, guidance_fn=None):
    sqrt_ab, eps_coef, sigma = step_coefficients(diffusion, from_levels, to_levels, eta)
    steps = dict(t=np.asarray(from_levels, np.int32), sqrt_alpha_bar_to=sqrt_ab,
                 eps_coef=eps_coef, sigma=sigma)
    steps = {k: jnp.asarray(v, jnp.int32 if k == 't' else jnp.float32) for k, v in steps.items()}

    def run_chunk(x, start, num_steps):
        chunk = {k: v[start:start + num_steps] for k, v in steps.items()}
        return ddim_steps(model_apply, params, diffusion, x, rng, chunk,
                          clip_denoised=clip_denoised, guidance_fn=guidance_fn)

    return run_chunked(run_chunk, x, len(from_levels), chunk_size, progress=progress, desc=desc)


def ddim_sample(model_apply, params, diffusion, rng, shape, *, num_steps, eta=0.0,
                spacing='leading', clip_denoised=True, chunk_size=None, progress=False,
                sharding=None, x_T=None, guidance_fn=None):
    """Samples x_0 with `num_steps` DDIM steps from x_T (drawn, or given as `x_T`).

    Args:
      model_apply, params, diffusion, rng, shape, clip_denoised, progress, sharding: as in
        `ancestral_sample`.
      num_steps: number of network evaluations.
      eta: 0 (deterministic) .. 1 (ancestral-like); the σ of DDIM eq. 16.
      spacing: see `timestep_sequence`.
      chunk_size: steps per jitted call (None: one scan); one x̂_0 snapshot per chunk.
      x_T: start from this latent (e.g. from `ddim_encode`) instead of drawing one.
      guidance_fn: optional classifier guidance (see `ddim_steps`).

    Returns:
      (x_0 [B, H, W, C], x̂_0 snapshots [num_chunks, B, H, W, C]).
    """
    levels = timestep_sequence(diffusion.num_timesteps, num_steps, spacing)[::-1]
    if x_T is None:
        x_T = jax.random.normal(jax.random.fold_in(rng, diffusion.num_timesteps), shape,
                                jnp.float32)
    if sharding is not None:
        x_T = jax.device_put(x_T, sharding)
    return _run(model_apply, params, diffusion, x_T, rng, levels, np.append(levels[1:], -1), eta,
                clip_denoised, chunk_size, progress, 'DDIM sampling', guidance_fn)


def ddim_encode(model_apply, params, diffusion, x0, *, num_steps, spacing='leading',
                chunk_size=None, progress=False):
    """Deterministic DDIM encoding of images to x_T (η = 0, the ODE run forwards).

    The steps go from the data (level -1) up through the timesteps of `timestep_sequence`; the
    step leaving level a evaluates the network at a (at 0 for the data, ᾱ_0 = 1 - β_1 ≈ 1).
    `ddim_sample(..., eta=0, x_T=latent, clip_denoised=False)` with the same `num_steps` and
    `spacing` decodes it; the round trip is exact as the step size goes to 0.

    Returns:
      x_T, [B, H, W, C].
    """
    levels = timestep_sequence(diffusion.num_timesteps, num_steps, spacing)
    x, _ = _run(model_apply, params, diffusion, jnp.asarray(x0, jnp.float32), jax.random.key(0),
                np.insert(levels[:-1], 0, -1), levels, 0.0, False, chunk_size, progress,
                'DDIM encoding')
    return x

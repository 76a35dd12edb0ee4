"""Predictor-corrector samplers of the reverse SDE (Song et al. 2021, §4.2 and Algorithms 1-5).

At each sampler time t_k = linspace(T, ε, N)[k]: `n_corrector` Langevin corrector steps at t_k,
then one predictor step of the reverse SDE from t_k towards t_{k+1}. This is the order of Song et
al.'s code; it is Algorithm 1's predictor-then-corrector with each corrector at the level the
predictor has just reached, plus one corrector step on the prior sample and none after the last
predictor step. Predictors:

  'euler_maruyama':    x ← x - [f - g² s] Δt + g sqrt(Δt) z,  Δt = 1/N (as Song et al.'s code)
  'reverse_diffusion': x ← x - f_i + G_i² s + G_i z            (SDE eq. 46, the discretized chain)
  'ancestral':         VP: x ← (x + β_i s) / sqrt(1 - β_i) + sqrt(β_i) z (DDPM's Algorithm 2
                       with σ² = β); VE: x ← x + (σ_i² - σ_{i-1}²) s + std z (SDE eq. 47)
  'none':              corrector only.

Langevin corrector (SDE Algorithms 4-5): x ← x + ε s + sqrt(2ε) z with ε = 2 α (r ‖z‖ / ‖s‖)²,
r the signal-to-noise ratio. As in Song et al.'s code, ‖z‖ and ‖s‖ are per-sample norms averaged
over the (global) batch: per-sample ratios blow up wherever ‖s‖ nears 0, which in low dimension
is common (measured on the 2-D mixture: MMD² 0.10-0.15 per sample, ≤ 0 with the batch mean). The
sampler returns the noise-free mean of the last predictor step ("denoising"; with predictor
'none', of the last corrector step).

Noise: x_T = prior(fold_in(rng, N)); step i draws its predictor noise from fold_in(rng, i) and
corrector step j from fold_in(fold_in(rng, i), j + 1), so chunking changes nothing.
"""

import functools
import math

import jax
import jax.numpy as jnp

from diffusion_jax import sde as sde_lib
from diffusion_jax.sampling.ancestral import keep_known
from diffusion_jax.sampling.ancestral import run_chunked
from diffusion_jax.sde import broadcast_batch as _b

PREDICTORS = ('euler_maruyama', 'reverse_diffusion', 'ancestral', 'none')
CORRECTORS = ('langevin', 'none')


def _per_sample_norm(v):
    return jnp.sqrt(jnp.sum(jnp.square(v).reshape(v.shape[0], -1), axis=-1))


def predictor_step(predictor, sde, score, x, t, z):
    """One predictor step at time t (vector [B]) with score s(x, t): (x, noise-free mean)."""
    if predictor == 'none':
        return x, x
    if predictor == 'euler_maruyama':
        dt = 1.0 / sde.N
        drift, g = sde.reverse(score, x, t)
        mean, std = x - drift * dt, g * math.sqrt(dt)
    elif predictor == 'reverse_diffusion':
        f, std = sde.discretize(x, t)
        mean = x - f + _b(jnp.square(std), x) * score
    elif predictor == 'ancestral':
        if isinstance(sde, sde_lib.VESDE):
            sigma, prev, var = sde.discrete_steps(t)
            mean, std = x + _b(var, x) * score, prev * jnp.sqrt(var) / sigma
        elif isinstance(sde, sde_lib.VPSDE) and not isinstance(sde, sde_lib.SubVPSDE):
            beta = sde.discrete_betas()[sde.discrete_index(t)]
            mean, std = (x + _b(beta, x) * score) / _b(jnp.sqrt(1.0 - beta), x), jnp.sqrt(beta)
        else:
            raise ValueError(f'The ancestral predictor needs a VP or VE SDE, got '
                             f'{type(sde).__name__}')
    else:
        raise ValueError(f'Unknown predictor {predictor!r}; valid: {", ".join(PREDICTORS)}')
    return mean + _b(std, x) * z, mean


def corrector_step(sde, score, x, t, z, snr):
    """One Langevin corrector step (SDE Algorithms 4-5): (x, noise-free mean)."""
    ratio = snr * jnp.mean(_per_sample_norm(z)) / jnp.mean(_per_sample_norm(score))
    step = 2.0 * sde.langevin_alpha(t) * jnp.square(ratio)
    mean = x + _b(step, x) * score
    return mean + _b(jnp.sqrt(2.0 * step), x) * z, mean


@functools.partial(jax.jit, static_argnames=('model_apply', 'sde', 'num_steps', 'predictor',
                                             'corrector', 'n_corrector'))
def pc_steps(model_apply, params, sde, x, rng, first, *, num_steps, predictor, corrector,
             n_corrector, snr, known=None):
    """Steps first .. first + num_steps - 1 of the PC sampler: (x, noise-free mean).

    `known` (SDEdit with a mask, as `ancestral.reverse_steps`): after step i the known pixels
    of x and of the mean are replaced by a draw of the marginal at the next time t_{i+1}, and by
    the known image itself after the last step.
    """
    times = sde.timesteps()

    def score_at(x, t):
        return sde_lib.score(model_apply, params, sde, x, t)

    def step(carry, i):
        x, _ = carry
        t = jnp.full((x.shape[0],), times[i], jnp.float32)
        step_rng = jax.random.fold_in(rng, i)
        mean = x
        if corrector == 'langevin':
            for j in range(n_corrector):  # Unrolled: n_corrector is small (usually 1).
                z = jax.random.normal(jax.random.fold_in(step_rng, j + 1), x.shape, x.dtype)
                x, mean = corrector_step(sde, score_at(x, t), x, t, z, snr)
        elif corrector != 'none':
            raise ValueError(f'Unknown corrector {corrector!r}; valid: {", ".join(CORRECTORS)}')
        if predictor != 'none':
            z = jax.random.normal(step_rng, x.shape, x.dtype)
            x, mean = predictor_step(predictor, sde, score_at(x, t), x, t, z)
        if known is not None:
            t_next = jnp.full((x.shape[0],), times[jnp.minimum(i + 1, sde.N - 1)], jnp.float32)
            noised = sde.q_sample(known['image'], t_next, jax.random.normal(
                jax.random.fold_in(step_rng, n_corrector + 1), x.shape, x.dtype))
            noised = jnp.where(i + 1 < sde.N, noised, known['image'])
            x, mean = keep_known(x, known, noised), keep_known(mean, known, noised)
        return (x, mean), None

    (x, mean), _ = jax.lax.scan(step, (x, x), first + jnp.arange(num_steps, dtype=jnp.int32))
    return x, mean


def pc_sample(model_apply, params, sde, rng, shape, *, predictor='reverse_diffusion',
              corrector='langevin', n_corrector=1, snr=0.16, denoise=True, chunk_size=None,
              progress=False, sharding=None, x_T=None, start_step=0, known=None):
    """Samples by predictor-corrector from the prior of `sde` (x_T = prior(fold_in(rng, N))).

    `x_T` with `start_step` k starts the chain from a given state at time t_k instead (SDEdit);
    `known` is passed to `pc_steps`.

    Returns:
      (x at t = ε, float32 [B, H, W, C]: the noise-free mean of the last update if `denoise`;
       snapshots of the noise-free mean at the last step of each chunk).
    """
    if predictor == 'none' and corrector == 'none':
        raise ValueError('A PC sampler needs a predictor or a corrector')
    if x_T is None:
        x_T = sde.prior_sampling(jax.random.fold_in(rng, sde.N), shape)
    if sharding is not None:
        x_T = jax.device_put(x_T, sharding)

    def run_chunk(x, start, num_steps):
        return pc_steps(model_apply, params, sde, x, rng, jnp.int32(start_step + start),
                        num_steps=num_steps, predictor=predictor, corrector=corrector,
                        n_corrector=n_corrector, snr=snr, known=known)

    x, snapshots = run_chunked(run_chunk, x_T, sde.N - start_step, chunk_size,
                               progress=progress, desc='PC sampling')
    return (snapshots[-1] if denoise else x), snapshots

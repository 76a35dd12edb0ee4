"""Interpolation in the diffusion latent (Ho et al. 2020, §4.3 and Fig. 8)."""

import jax
import jax.numpy as jnp

from diffusion_jax.sampling.ancestral import reverse_chain


def interpolate(model_apply, params, diffusion, x0_a, x0_b, rng, *, t, num_lambdas=8,
                clip_denoised=True, chunk_size=None, sharding=None):
    """Encodes two images to x_t with the same noise, mixes them, decodes by the reverse chain.

    x_t^a, x_t^b ~ q(x_t | x_0) share one noise draw; x̄_t = (1 - λ) x_t^a + λ x_t^b for λ evenly
    spaced in [0, 1]. Every λ is decoded with the same reverse-process noise (the paper fixes
    it), so the rows differ only through the latent.

    Args:
      model_apply, params, diffusion: as in `ancestral_sample`.
      x0_a, x0_b: [N, H, W, C] source images in [-1, 1].
      rng: key; the encoder noise is fold_in(rng, T + 1), the reverse noise as in the sampler.
      t: int, the encoding time (code index; the paper shows t = 500 of 1000).
      num_lambdas: number of mixing weights, endpoints included.
      clip_denoised, chunk_size: as in `ancestral_sample`.
      sharding: optional sharding of the [num_lambdas, N, H, W, C] latents (all λ are decoded
        as one batch).

    Returns:
      [N, num_lambdas, H, W, C] decoded images.
    """
    if x0_a.shape != x0_b.shape:
        raise ValueError(f'source images differ in shape: {x0_a.shape} vs {x0_b.shape}')
    if not 0 <= t < diffusion.num_timesteps:
        raise ValueError(f't must be in [0, {diffusion.num_timesteps}), got {t}')
    noise = jax.random.normal(jax.random.fold_in(rng, diffusion.num_timesteps + 1), x0_a.shape)
    t_vec = jnp.full((x0_a.shape[0],), t, dtype=jnp.int32)
    x_t_a = diffusion.q_sample(x0_a, t_vec, noise)
    x_t_b = diffusion.q_sample(x0_b, t_vec, noise)
    lams = jnp.linspace(0.0, 1.0, num_lambdas)[:, None, None, None, None]
    mixed = (1 - lams) * x_t_a + lams * x_t_b  # [num_lambdas, N, H, W, C]
    if sharding is not None:
        mixed = jax.device_put(mixed, sharding)

    def decode(x_t):  # vmap over λ: the reverse noise, drawn from rng alone, is shared by all λ.
        return reverse_chain(model_apply, params, diffusion, x_t, rng, t_start=t,
                             clip_denoised=clip_denoised, chunk_size=chunk_size)[0]

    return jnp.swapaxes(jax.vmap(decode)(mixed), 0, 1)

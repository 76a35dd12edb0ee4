"""SDEdit (Meng et al. 2022): edit a guide image by noising it to time t0 and running the
reverse process from there; t0 trades faithfulness to the guide (small t0) for realism (large).

t0 is a fraction of the process's time: DDPM runs the last round(t0 T) ancestral steps, starting
from x_{n-1} ~ q(x_{n-1} | guide) with n = round(t0 T); a score SDE runs the PC sampler from the
first of its times t_k <= t0, starting from the marginal p_0t_k(x | guide). t0 = 0 returns the
guide. Repeating K times feeds each output back in as the next guide (SDEdit's K).

With a mask (1 = keep the guide's pixel) the known region is pinned to the guide at the current
noise level: after every step to level s, its pixels are replaced by a fresh draw of
q(x_s | guide), and by the guide itself after the last step. We use the level the state has just
reached, not the one it left, so the known and generated pixels always carry the same amount of
noise when the network next sees them (RePaint's convention; SDEdit's released code re-noises to
the level the step left, reusing one draw per round: docs/guidance.md).

Noise: round k uses the key fold_in(rng, k): its starting draw comes from fold_in(key, 2^32 - 1),
its steps follow the sampler's own contract with that key.
"""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import errors
from diffusion_jax import sde as sde_lib
from diffusion_jax.sampling import ancestral
from diffusion_jax.sampling import pc

_START_STREAM = 0xFFFFFFFF


def start_index(process, t0):
    """How far into the reverse chain an edit at t0 starts.

    Returns:
      DDPM: the number n = round(t0 T) of reverse steps; SDE: the index k of the first sampler
      time t_k <= t0 (N - k steps are left), or N when t0 is below every t_k (no steps).
    """
    if not 0.0 <= t0 <= 1.0:
        raise errors.ConfigError(
            f'edit.t0 must be in [0, 1] (a fraction of the diffusion time), got {t0}')
    if isinstance(process, diffusion_lib.Diffusion):
        return int(round(t0 * process.num_timesteps))
    times = np.asarray(jax.device_get(process.timesteps()))
    return int(np.searchsorted(-times, -t0))  # times decrease from T to sample_eps.


def sdedit(model_apply, params, process, guide, rng, *, t0, mask=None, repeats=1,
           sampling_config=None, guidance_fn=None, progress=False):
    """Edits `guide` images with SDEdit.

    Args:
      model_apply, params: the network (as for the samplers).
      process: a DDPM `Diffusion` (ancestral steps) or a score `sde.SDE` (the PC sampler).
      guide: float [B, H, W, C] in [-1, 1].
      rng: key.
      t0: starting time as a fraction of the process's time, in [0, 1].
      mask: optional [B, H, W, C] or broadcastable, 1 where the guide is kept.
      repeats: K, how many noise-and-denoise rounds.
      sampling_config: the `sampling` block (clip_denoised; the PC predictor, corrector, snr,
        chunk_size); None uses the defaults of the samplers.
      guidance_fn: optional classifier guidance (DDPM only).

    Returns:
      float32 [repeats, B, H, W, C]: the output of each round.
    """
    if not isinstance(repeats, int) or repeats < 1:
        raise errors.ConfigError(f'edit.repeats must be a positive integer, got {repeats!r}')
    guide = jnp.asarray(guide, jnp.float32)
    if guide.ndim != 4:
        raise errors.ConfigError(f'guide images must have shape [B, H, W, C], got {guide.shape}')
    known = None if mask is None else dict(
        image=guide, mask=jnp.broadcast_to(jnp.asarray(mask, jnp.float32), guide.shape))
    s = sampling_config
    chunk_size = None if s is None else s.chunk_size
    if isinstance(process, diffusion_lib.Diffusion):
        steps = start_index(process, t0)
    elif isinstance(process, sde_lib.SDE):
        if guidance_fn is not None:
            raise errors.ConfigError('classifier guidance in SDEdit needs a DDPM process')
        first = start_index(process, t0)
        steps = process.N - first
    else:
        raise errors.ConfigError(
            f'SDEdit needs a DDPM or score SDE process, got {type(process).__name__}')
    outputs, x0 = [], guide
    for k in range(repeats):
        round_rng = jax.random.fold_in(rng, k)
        noise = jax.random.normal(jax.random.fold_in(round_rng, _START_STREAM), guide.shape)
        if steps == 0:
            pass  # t0 = 0 (or below every sampler time): nothing to undo.
        elif isinstance(process, diffusion_lib.Diffusion):
            t = jnp.full((guide.shape[0],), steps - 1, jnp.int32)
            x0, _ = ancestral.reverse_chain(
                model_apply, params, process, process.q_sample(x0, t, noise), round_rng,
                t_start=steps - 1, clip_denoised=True if s is None else s.clip_denoised,
                chunk_size=chunk_size, progress=progress, guidance_fn=guidance_fn, known=known)
        else:
            t = jnp.full((guide.shape[0],), process.timesteps()[first], jnp.float32)
            kwargs = {} if s is None else dict(predictor=s.predictor, corrector=s.corrector,
                                               n_corrector=s.n_corrector, snr=s.snr,
                                               denoise=s.denoise)
            x0, _ = pc.pc_sample(model_apply, params, process, round_rng, guide.shape,
                                 x_T=process.q_sample(x0, t, noise), start_step=first,
                                 known=known, chunk_size=chunk_size, progress=progress,
                                 **kwargs)
        outputs.append(x0)
    return jnp.stack(outputs)


def blocky_strokes(images, block=4, threshold=0.0):
    """Coarse stroke paintings of images (the SDEdit stroke-to-image input): each block x block
    tile's mean, thresholded to ink (1) or paper (-1), painted back at full size.

    Args:
      images: float [B, H, W, C] in [-1, 1], H and W divisible by `block`.

    Returns:
      float32 [B, H, W, C] in {-1, 1}.
    """
    images = np.asarray(images, np.float32)
    b, h, w, c = images.shape
    if h % block or w % block:
        raise errors.ConfigError(f'image size {h}x{w} is not divisible by the block size {block}')
    tiles = images.reshape(b, h // block, block, w // block, block, c).mean(axis=(2, 4))
    strokes = np.where(tiles > threshold, 1.0, -1.0).astype(np.float32)
    return strokes.repeat(block, axis=1).repeat(block, axis=2)

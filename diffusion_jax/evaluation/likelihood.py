"""Negative log-likelihood in bits/dim from the variational bound, and rate–distortion.

The bound (Ho et al. 2020, eq. 5) needs one forward pass per timestep and image: it is evaluated
in jitted chunks of timesteps (a progress bar advances per chunk) with the noise of step t drawn
from fold_in(rng, t), so the chunking does not change the numbers.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from diffusion_jax import diffusion as diffusion_lib


@functools.partial(jax.jit, static_argnames=('model_apply', 'clip_denoised', 'timestep_batch'))
def _bound_chunk(model_apply, params, diffusion, x0, rng, timesteps, *, clip_denoised,
                 timestep_batch):
    denoise_fn = functools.partial(model_apply, params)
    return diffusion_lib.bound_terms(denoise_fn, diffusion, x0, rng, timesteps,
                                     clip_denoised=clip_denoised, timestep_batch=timestep_batch)


def bits_per_dim(model_apply, params, diffusion, images, rng, *, batch_size, sharding=None,
                 timestep_chunk=100, timestep_batch=1, clip_denoised=True, progress=True):
    """Every term of the bound for uint8 images, averaged where it helps plotting.

    Args:
      model_apply: (params, x, t) -> model output; reuse one function object (jit static).
      params: the (EMA) parameters.
      diffusion: `Diffusion`.
      images: uint8 [N, H, W, C].
      rng: key; each image batch b uses fold_in(rng, b).
      batch_size: images per call (the last batch may be smaller).
      sharding: optional sharding of each image batch (batch axis over a data mesh).
      timestep_chunk: timesteps per jitted call.
      timestep_batch: timesteps vectorized together inside a call (`lax.map` batch size).
      clip_denoised: clip x̂_0 in p, as the original evaluation does.

    Returns:
      dict of NumPy arrays: `total_bpd` [N], `prior_bpd` [N], `terms_bpd` [T] and
      `x0_mse` [T] (means over the images; x̂_0 error in [-1, 1] units).
    """
    num_timesteps = diffusion.num_timesteps
    starts = range(0, num_timesteps, timestep_chunk)
    num_batches = -(-len(images) // batch_size)
    totals, priors = [], []
    terms_sum = np.zeros(num_timesteps)
    mse_sum = np.zeros(num_timesteps)
    with tqdm(total=num_batches * len(starts), desc='bits/dim', disable=not progress) as bar:
        for b in range(num_batches):
            x0 = jnp.asarray(images[b * batch_size:(b + 1) * batch_size], jnp.float32)
            x0 = x0 / 127.5 - 1.0
            if sharding is not None and x0.shape[0] % sharding.mesh.devices.size == 0:
                x0 = jax.device_put(x0, sharding)
            batch_rng = jax.random.fold_in(rng, b)
            terms, mses = [], []
            for start in starts:
                timesteps = jnp.arange(start, min(start + timestep_chunk, num_timesteps))
                term, mse = _bound_chunk(model_apply, params, diffusion, x0, batch_rng,
                                         timesteps, clip_denoised=clip_denoised,
                                         timestep_batch=timestep_batch)
                terms.append(np.asarray(term, np.float64))
                mses.append(np.asarray(mse, np.float64))
                bar.update(1)
            terms, mses = np.concatenate(terms, axis=1), np.concatenate(mses, axis=1)
            prior = np.asarray(diffusion.prior_bpd(x0), np.float64)
            totals.append(terms.sum(axis=1) + prior)
            priors.append(prior)
            terms_sum += terms.sum(axis=0)
            mse_sum += mses.sum(axis=0)
    return dict(total_bpd=np.concatenate(totals), prior_bpd=np.concatenate(priors),
                terms_bpd=terms_sum / len(images), x0_mse=mse_sum / len(images))


def rate_distortion(terms_bpd, prior_bpd, x0_mse):
    """Progressive lossy compression (paper §4.3, Fig. 5) from the mean bound terms.

    A receiver holding x_t (code index t) has been sent the prior term and the terms that carried
    x_{T-2}, ..., x_t, i.e. rate(t) = L_T + Σ_{s > t} L_s; it reconstructs x̂_0 from x_t with
    distortion RMSE(t) on the [0, 255] scale.

    Args:
      terms_bpd: [T] mean bound terms in bits/dim (index 0 is the decoder term).
      prior_bpd: scalar mean prior term.
      x0_mse: [T] mean squared error of x̂_0 in [-1, 1] units.

    Returns:
      (rate [T] in bits/dim, distortion [T] as RMSE on [0, 255]), indexed by t.
    """
    terms_bpd = np.asarray(terms_bpd, np.float64)
    after = np.concatenate([np.cumsum(terms_bpd[::-1])[::-1][1:], [0.0]])  # Σ_{s > t} L_s
    rate = float(prior_bpd) + after
    distortion = np.sqrt(np.asarray(x0_mse, np.float64)) * 127.5
    return rate, distortion

"""FID and Inception Score, computed as the standard tools do.

* `frechet_distance`: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) in float64 with
  `scipy.linalg.sqrtm`; if the square root is not finite (singular product) it is retried with
  eps*I added to both covariances, and a negligible imaginary part is discarded (pytorch-fid's
  `calculate_frechet_distance`).
* `inception_score`: exp(E_x KL(p(y|x) || p(y))) over `splits` consecutive chunks, returning
  (mean, std) over the chunks (improved-gan's `get_inception_score`). Feed it the softmax of
  the Inception's `logits_unbiased` (1008 classes) to reproduce the original numbers.
* `compute_statistics`: pool3 mean / covariance of a set of uint8 NHWC images.

Reference statistics are `.npz` files with `mu` [D] and `sigma` [D, D] (other keys are ignored:
pytorch-fid's published files hold only these two, guided-diffusion's reference batches add
`arr_0`, `mu_s`, `sigma_s`); `reference_stats` makes them for any configured dataset.
"""

import os
import warnings

import numpy as np
import scipy.linalg
import scipy.special
from tqdm import tqdm

from diffusion_jax import errors


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), as a Python float."""
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f'mean vectors have different or non-vector shapes: {mu1.shape}, '
                         f'{mu2.shape}')
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f'covariances must be {(d, d)}, got {sigma1.shape}, {sigma2.shape}')

    diff = mu1 - mu2
    with warnings.catch_warnings():
        # Singular products are expected (dead ReLU units, N < d); a non-finite root is retried
        # below, so scipy's "Matrix is singular" warning is only noise here.
        warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(d) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f'sqrtm(S1 S2) has a significant imaginary component '
                             f'{np.max(np.abs(covmean.imag))}')
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(probs, splits=10):
    """Inception Score of class probabilities `probs` [N, K] -> (mean, std) over `splits`."""
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2:
        raise ValueError(f'probs must be [N, K], got shape {probs.shape}')
    n = probs.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f'need 1 <= splits <= N, got splits={splits}, N={n}')
    scores = []
    for i in range(splits):
        part = probs[i * n // splits:(i + 1) * n // splits]
        p_y = part.mean(axis=0, keepdims=True)
        kl = scipy.special.rel_entr(part, p_y).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def compute_activations(images, apply_fn, batch_size=250, key='pool3', progress=True):
    """Runs `apply_fn` (batch of images -> array or dict of arrays, e.g. an Inception
    `build_apply_fn`) over `images` [N, H, W, C] in batches; returns float64 [N, ...] of
    output `key` (when the output is a dict), or a dict of them when `key` is a tuple. The last
    batch is padded to `batch_size` so a jitted `apply_fn` compiles once."""
    n = len(images)
    if n == 0:
        raise ValueError('no images')
    keys = key if isinstance(key, tuple) else (key,)
    batch_size = max(1, min(int(batch_size), n))
    chunks = {k: [] for k in keys}
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc=f'inception {"+".join(keys)}', unit='batch',
                      disable=not progress):
        batch = np.asarray(images[start:start + batch_size])
        real = batch.shape[0]
        if real < batch_size:
            pad = np.repeat(batch[-1:], batch_size - real, axis=0)
            batch = np.concatenate([batch, pad], axis=0)
        out = apply_fn(batch)
        for k in keys:
            chunks[k].append(np.asarray(out[k] if isinstance(out, dict) else out,
                                        np.float64)[:real])
    result = {k: np.concatenate(v, axis=0) for k, v in chunks.items()}
    return result if isinstance(key, tuple) else result[key]


def compute_statistics(images, apply_fn, batch_size=250, progress=True):
    """(mu [D], sigma [D, D]) of the pool3 features of `images` (uint8 NHWC)."""
    feats = compute_activations(images, apply_fn, batch_size, key='pool3', progress=progress)
    if feats.shape[0] < 2:
        raise ValueError('need at least 2 images for a covariance')
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def compute_inception_score(images, apply_fn, batch_size=250, splits=10, progress=True):
    """Inception Score (mean, std) of `images` (uint8 NHWC): softmax of the 1008
    `logits_unbiased`, as the original improved-gan code."""
    logits = compute_activations(images, apply_fn, batch_size, key='logits_unbiased',
                                 progress=progress)
    return inception_score(scipy.special.softmax(logits, axis=-1), splits=splits)


def save_statistics(path, mu, sigma, **metadata):
    """Writes reference statistics (`mu`, `sigma`, and scalar `metadata`) to an `.npz`."""
    np.savez(os.fspath(path), mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
             **{k: np.asarray(v) for k, v in metadata.items()})


def as_rgb(images):
    """uint8 [N, H, W, 1 or 3] as RGB: one-channel images repeated, as is usual for MNIST."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f'images must be uint8 [N, H, W, 1 or 3], got shape {images.shape}')
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def load_reference(path):
    """Loads reference statistics (mu, sigma) from an `.npz` with keys `mu` and `sigma`."""
    path = os.fspath(path)
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise errors.InputError(f'{path}: expected an .npz with keys "mu" and "sigma"')
    with data:
        missing = [k for k in ('mu', 'sigma') if k not in data.files]
        if missing:
            raise errors.InputError(
                f'{path}: reference statistics lack key {missing[0]!r} '
                f'(found {sorted(data.files)}); expected "mu" [D], "sigma" [D, D]')
        mu, sigma = np.asarray(data['mu'], np.float64), np.asarray(data['sigma'], np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise errors.InputError(f'{path}: inconsistent shapes mu {mu.shape}, sigma {sigma.shape}')
    return mu, sigma


def inception_metrics(images, weights_path, reference_path=None, *, batch_size=250, splits=10,
                      progress=True):
    """Inception FID (against `reference_path`, if given) and IS of uint8 images, in one pass.

    Args:
      images: uint8 [N, H, W, C]; one-channel images are repeated to RGB, as is usual for MNIST.
      weights_path: FID Inception weights (.npz; scripts/convert_inception_weights.py).
      reference_path: optional .npz of reference statistics (`mu`, `sigma`).
      batch_size: images per Inception call.
      splits: IS splits (at most N).

    Returns:
      dict(inception_score, inception_score_std, num_samples[, fid]).
    """
    from diffusion_jax.evaluation import inception
    images = as_rgb(images)
    apply_fn = inception.build_apply_fn(inception.load_params(weights_path))
    acts = compute_activations(images, apply_fn, batch_size, key=('pool3', 'logits_unbiased'),
                               progress=progress)
    is_mean, is_std = inception_score(scipy.special.softmax(acts['logits_unbiased'], axis=1),
                                      splits=min(splits, len(images)))
    results = dict(inception_score=is_mean, inception_score_std=is_std,
                   num_samples=len(images))
    if reference_path:
        if len(images) < 2:
            raise ValueError('FID needs at least 2 images for a covariance')
        mu_ref, sigma_ref = load_reference(reference_path)
        feats = acts['pool3']
        results['fid'] = frechet_distance(feats.mean(axis=0), np.cov(feats, rowvar=False),
                                          mu_ref, sigma_ref)
    return results

"""Two-sample distances for low-dimensional checks: kernel MMD and sliced Wasserstein.

Both compare samples {x_i} (n points) and {y_j} (m points) in R^d; the ground-truth checks
compare sampler output with fresh data and judge the value against data-vs-data at the same n.
"""

import numpy as np


def mmd_squared(x, y, bandwidths=(0.1, 0.3, 1.0, 3.0)):
    """Unbiased MMD² (Gretton et al. 2012, eq. 3) with a sum of Gaussian kernels
    k(a, b) = Σ_h exp(-‖a - b‖² / (2 h²)); float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

    def gram(a, b):
        d2 = np.sum(a ** 2, 1)[:, None] + np.sum(b ** 2, 1)[None] - 2.0 * a @ b.T
        return sum(np.exp(-np.maximum(d2, 0.0) / (2.0 * h * h)) for h in bandwidths)

    kxx, kyy, kxy = gram(x, x), gram(y, y), gram(x, y)
    n, m = len(x), len(y)
    within_x = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return within_x + within_y - 2.0 * kxy.mean()


def sliced_wasserstein(x, y, num_projections=256, seed=0):
    """Sliced 2-Wasserstein distance: sqrt of the mean over random unit directions of the squared
    W2 between the 1-D projections (equal sample sizes, so W2 pairs sorted values)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) != len(y):
        raise ValueError(f'sliced_wasserstein needs equal sample sizes, got {len(x)} and {len(y)}')
    dirs = np.random.default_rng(seed).normal(size=(num_projections, x.shape[1]))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    px, py = np.sort(x @ dirs.T, axis=0), np.sort(y @ dirs.T, axis=0)
    return float(np.sqrt(np.mean((px - py) ** 2)))

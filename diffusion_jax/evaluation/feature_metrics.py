"""Feature-space sample-quality metrics: Fréchet distance, KID, classifier Inception Score.

On MNIST-5k they use the features of the small shipped classifier (`classifier`), not
Inception, so the numbers are reported as:

  fd_mnist5k     Fréchet distance of the 128-d classifier features to the MNIST-5k test split
                 (NOT comparable to FID; biased upwards for small sample counts — always report
                 `num_samples` with it);
  kid_mean/std   KID (Bińkowski et al. 2018): unbiased MMD² with the cubic polynomial kernel
                 k(x, y) = (x·y / d + 1)³, mean and std over random subsets;
  classifier_is  exp(E_x KL(p(y|x) ‖ p(y))) with the classifier's softmax, mean over splits
                 (the maximum is 10, the number of classes).

The reference side is shipped in `assets/`: the test split's feature mean and covariance
(`mnist5k_test_stats.npz`, float64) and, for KID, the 500 test features themselves
(`mnist5k_test_features.npz`, float32, ~250 KB) — shipped rather than recomputed so the metrics
need neither a tfds data dir nor the dataset build.
"""

import functools

import numpy as np
import scipy.special

from diffusion_jax.evaluation import classifier as classifier_lib
from diffusion_jax.evaluation.fid import frechet_distance, inception_score


def _polynomial_kernel(x, y):
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_unbiased(x, y):
    """Unbiased MMD² estimate between equally sized samples x, y [m, d]."""
    m = x.shape[0]
    k_xx = _polynomial_kernel(x, x)
    k_yy = _polynomial_kernel(y, y)
    k_xy = _polynomial_kernel(x, y)
    off_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    off_yy = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return off_xx + off_yy - 2.0 * k_xy.mean()


def kid(features1, features2, num_subsets=100, subset_size=1000, seed=0):
    """Kernel Inception Distance (generic features): mean and std of MMD² over subsets.

    Each subset draws `subset_size` rows without replacement from each feature set (sizes
    capped at the smaller set), independently per subset, from a NumPy generator seeded with
    `seed` (so the value is deterministic).

    Returns:
      (kid_mean, kid_std) as floats; std is the population std over the subsets.
    """
    features1 = np.asarray(features1, np.float64)
    features2 = np.asarray(features2, np.float64)
    if features1.ndim != 2 or features2.ndim != 2 or features1.shape[1] != features2.shape[1]:
        raise ValueError(f'expected [N, d] features, got {features1.shape}, {features2.shape}')
    m = min(subset_size, features1.shape[0], features2.shape[0])
    if m < 2:
        raise ValueError('KID needs at least 2 samples per set')
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets, np.float64)
    for i in range(num_subsets):
        x = features1[rng.choice(features1.shape[0], m, replace=False)]
        y = features2[rng.choice(features2.shape[0], m, replace=False)]
        values[i] = _mmd2_unbiased(x, y)
    return float(values.mean()), float(values.std())


def classifier_inception_score(logits, splits=10):
    """exp(E_x KL(p(y|x) ‖ p(y))) from classifier logits: (mean, std) over `splits`."""
    return inception_score(scipy.special.softmax(np.asarray(logits, np.float64), axis=1), splits)


@functools.lru_cache(maxsize=1)
def mnist5k_reference():
    """(mu, sigma, features) of the MNIST-5k test split, from the shipped assets."""
    with classifier_lib.asset_path(classifier_lib.STATS_FILE).open('rb') as f:
        with np.load(f, allow_pickle=False) as data:
            mu, sigma = data['mu'], data['sigma']
    with classifier_lib.asset_path(classifier_lib.FEATURES_FILE).open('rb') as f:
        with np.load(f, allow_pickle=False) as data:
            features = data['features']
    return mu, sigma, features


def mnist5k_metrics(samples_uint8, *, labels=None, batch_size=500, kid_num_subsets=100,
                    kid_subset_size=1000, is_splits=10, seed=0):
    """FD-MNIST5k, KID and classifier IS of uint8 samples [N, 28, 28, 1] vs the test split.

    KID subsets hold min(kid_subset_size, N, 500) samples (the reference has 500 images).
    FD-MNIST5k is biased in N: compare values only at equal `num_samples`.

    Returns:
      dict(fd_mnist5k, kid_mean, kid_std, classifier_is, num_samples, class_counts): the last
      is how many samples the classifier assigns to each digit (all ten classes present?).
      With `labels` (the digit each sample should be), also `accuracy`: the fraction the
      classifier assigns to its label.
    """
    features, logits = classifier_lib.features_and_logits(samples_uint8, batch_size)
    mu_ref, sigma_ref, features_ref = mnist5k_reference()
    features64 = features.astype(np.float64)
    mu = features64.mean(axis=0)
    sigma = np.cov(features64, rowvar=False)
    kid_mean, kid_std = kid(features, features_ref, kid_num_subsets, kid_subset_size, seed)
    is_mean, _ = classifier_inception_score(logits, is_splits)
    extra = {} if labels is None else {
        'accuracy': float(np.mean(logits.argmax(-1) == np.asarray(labels)))}
    return extra | {
        'fd_mnist5k': frechet_distance(mu, sigma, mu_ref, sigma_ref),
        'kid_mean': kid_mean,
        'kid_std': kid_std,
        'classifier_is': is_mean,
        'num_samples': int(features.shape[0]),
        'class_counts': np.bincount(logits.argmax(-1), minlength=10).tolist(),
    }


def real_digit_floor(train_images, train_labels, n, num_subsets=8):
    """The metrics of n real training digits, mean and std over `num_subsets` disjoint sets of
    n (contiguous in source order): the floor a model's n samples are compared with. Training
    digits, not test digits, which are the reference set itself."""
    if num_subsets * n > len(train_images):
        raise ValueError(f'{num_subsets} disjoint sets of {n} need {num_subsets * n} images, '
                         f'got {len(train_images)}')
    rows = [mnist5k_metrics(train_images[i * n:(i + 1) * n],
                            labels=train_labels[i * n:(i + 1) * n], kid_num_subsets=10)
            for i in range(num_subsets)]
    floor = dict(num_samples=n, subsets=num_subsets)
    for key in ('fd_mnist5k', 'classifier_is', 'accuracy'):
        values = [r[key] for r in rows]
        floor[key], floor[key + '_std'] = float(np.mean(values)), float(np.std(values))
    return floor

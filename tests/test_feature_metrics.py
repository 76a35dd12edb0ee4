"""Feature metrics (Fréchet distance, KID, classifier IS) and the shipped MNIST-5k classifier."""

import json

import jax
import numpy as np
import pytest

from diffusion_jax.data import pipeline
from diffusion_jax.evaluation import classifier as classifier_lib
from diffusion_jax.evaluation import feature_metrics


def _sqrt_psd(a):
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _frechet_reference(mu1, sigma1, mu2, sigma2):
    """tr((S1 S2)^½) = tr((S1^½ S2 S1^½)^½), the latter symmetric: eigenvalues only."""
    root1 = _sqrt_psd(sigma1)
    eig = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    tr_covmean = np.sum(np.sqrt(np.clip(eig, 0.0, None)))
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean


def _random_stats(rng, n, d, scale=1.0):
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * scale + rng.normal(size=d)
    return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


def test_frechet_distance_matches_eigendecomposition_reference():
    rng = np.random.default_rng(0)
    for d in (1, 5, 32):
        mu1, sigma1 = _random_stats(rng, 200, d)
        mu2, sigma2 = _random_stats(rng, 300, d, scale=0.5)
        got = feature_metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
        want = _frechet_reference(mu1, sigma1, mu2, sigma2)
        np.testing.assert_allclose(got, want, rtol=1e-8)
        # Symmetric in its two arguments.
        np.testing.assert_allclose(feature_metrics.frechet_distance(mu2, sigma2, mu1, sigma1),
                                   want, rtol=1e-8)


def test_frechet_distance_identical_and_singular():
    rng = np.random.default_rng(1)
    mu, sigma = _random_stats(rng, 100, 16)
    assert abs(feature_metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)
    # Rank-deficient covariances (dead ReLU units, fewer samples than dims) stay finite.
    x = np.maximum(rng.normal(size=(10, 16)), 0.0)
    x[:, :4] = 0.0
    y = np.maximum(rng.normal(size=(12, 16)), 0.0)
    y[:, :4] = 0.0
    args = (x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    got = feature_metrics.frechet_distance(*args)
    assert np.isfinite(got)
    np.testing.assert_allclose(got, _frechet_reference(*args), rtol=1e-3, atol=1e-4)


def _mmd2_double_loop(x, y):
    m, d = x.shape
    k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return kxx + kyy - 2.0 * kxy


def test_kid_matches_double_loop_reference():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(15, 6))
    y = rng.normal(size=(15, 6)) * 1.3 + 0.2
    # Subsets of the full size are permutations: every subset gives the full-set estimate.
    mean, std = feature_metrics.kid(x, y, num_subsets=4, subset_size=100)
    np.testing.assert_allclose(mean, _mmd2_double_loop(x, y), rtol=1e-10)
    assert std < 1e-12

    # Proper subsets: each draws subset_size rows without replacement from each set.
    x = rng.normal(size=(25, 6))
    y = rng.normal(size=(30, 6)) + 0.5
    mean, std = feature_metrics.kid(x, y, num_subsets=5, subset_size=12, seed=7)
    draws = np.random.default_rng(7)
    values = []
    for _ in range(5):
        xs = x[draws.choice(25, 12, replace=False)]
        ys = y[draws.choice(30, 12, replace=False)]
        values.append(_mmd2_double_loop(xs, ys))
    np.testing.assert_allclose(mean, np.mean(values), rtol=1e-10)
    np.testing.assert_allclose(std, np.std(values), rtol=1e-8)
    assert mean > 0


def test_classifier_inception_score_matches_reference():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(103, 10)) * 3.0
    scores = []
    # The standard tools' split rule: rows [i*N//splits, (i+1)*N//splits).
    for part in (logits[i * 103 // 4:(i + 1) * 103 // 4] for i in range(4)):
        p = np.exp(part - part.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        py = p.mean(0)
        kl = [sum(pi[c] * (np.log(pi[c]) - np.log(py[c])) for c in range(10)) for pi in p]
        scores.append(np.exp(np.mean(kl)))
    mean, std = feature_metrics.classifier_inception_score(logits, splits=4)
    np.testing.assert_allclose(mean, np.mean(scores), rtol=1e-10)
    np.testing.assert_allclose(std, np.std(scores), rtol=1e-8)
    # Bounds: constant predictions → 1; confident, balanced predictions → number of classes.
    assert feature_metrics.classifier_inception_score(np.zeros((50, 10)), 2)[0] == pytest.approx(1)
    confident = np.eye(10)[np.arange(100) % 10] * 100.0
    assert feature_metrics.classifier_inception_score(confident, 2)[0] == pytest.approx(10)


@pytest.fixture(scope='module')
def mnist5k(data_dir):
    test = pipeline.load_split('mnist5k', 'test', data_dir=data_dir)
    train = pipeline.load_split('mnist5k', 'train', data_dir=data_dir)
    return {'test': test, 'train': train}


def test_shipped_classifier_loads_without_pickle_and_matches_recorded_accuracy(mnist5k):
    with classifier_lib.asset_path(classifier_lib.WEIGHTS_FILE).open('rb') as f:
        with np.load(f, allow_pickle=False) as data:
            keys = set(data.files)
            assert all(data[k].dtype == np.float32 for k in keys)
    module, params = classifier_lib.load_classifier()
    init = module.init(jax.random.PRNGKey(0), np.zeros((1, 28, 28, 1), np.uint8))['params']
    assert keys == set(classifier_lib.params_to_flat(init))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(init)

    info = json.loads(classifier_lib.asset_path(classifier_lib.INFO_FILE).read_text())
    images, labels = mnist5k['test']
    features, logits = classifier_lib.features_and_logits(images)
    assert features.shape == (500, info['feature_dim']) and logits.shape == (500, 10)
    assert (features >= 0).all()  # after ReLU
    accuracy = np.mean(np.argmax(logits, -1) == labels)
    assert abs(accuracy - info['test_accuracy']) <= 0.005
    assert accuracy >= 0.97


def test_fd_mnist5k_test_train_and_noise(mnist5k):
    mu_ref, sigma_ref, features_ref = feature_metrics.mnist5k_reference()
    assert mu_ref.dtype == np.float64 and sigma_ref.dtype == np.float64
    scale = np.trace(sigma_ref)

    images, labels = mnist5k['test']
    test_metrics = feature_metrics.mnist5k_metrics(images, labels=labels, kid_num_subsets=10)
    assert set(test_metrics) == {'fd_mnist5k', 'kid_mean', 'kid_std', 'classifier_is',
                                 'num_samples', 'class_counts', 'accuracy'}
    assert test_metrics['num_samples'] == 500
    # The classifier's predictions of the 50 test digits per class, and its accuracy on them.
    _, logits = classifier_lib.features_and_logits(images)
    assert test_metrics['class_counts'] == np.bincount(logits.argmax(-1), minlength=10).tolist()
    assert sum(test_metrics['class_counts']) == 500
    assert all(45 <= c <= 55 for c in test_metrics['class_counts'])
    assert test_metrics['accuracy'] == np.mean(logits.argmax(-1) == labels) >= 0.97
    assert abs(test_metrics['fd_mnist5k']) < 1e-6 * scale
    # KID of a set against itself is negative (the cross term keeps the self-similarities).
    assert test_metrics['kid_mean'] < 0 and test_metrics['kid_std'] < 1e-6
    assert test_metrics['classifier_is'] > 5.0
    # The shipped features are the test-split features.
    features, _ = classifier_lib.features_and_logits(mnist5k['test'][0])
    np.testing.assert_allclose(features, features_ref, rtol=1e-5, atol=1e-5)

    train = feature_metrics.mnist5k_metrics(mnist5k['train'][0], kid_num_subsets=10)
    rng = np.random.default_rng(0)
    noise_images = rng.integers(0, 256, size=(500, 28, 28, 1), dtype=np.uint8)
    noise = feature_metrics.mnist5k_metrics(noise_images, kid_num_subsets=10)
    assert 0 < train['fd_mnist5k'] < 0.05 * scale
    assert noise['fd_mnist5k'] > 20 * train['fd_mnist5k']
    assert noise['kid_mean'] > 100 * abs(train['kid_mean'])
    assert train['classifier_is'] > noise['classifier_is']


def test_real_digit_floor_is_the_mean_over_disjoint_sets(mnist5k):
    images, labels = mnist5k['train']
    floor = feature_metrics.real_digit_floor(images, labels, 100, num_subsets=3)
    rows = [feature_metrics.mnist5k_metrics(images[i * 100:(i + 1) * 100],
                                            labels=labels[i * 100:(i + 1) * 100],
                                            kid_num_subsets=10) for i in range(3)]
    for key in ('fd_mnist5k', 'classifier_is', 'accuracy'):
        values = [r[key] for r in rows]
        assert floor[key] == pytest.approx(np.mean(values), rel=1e-12)
        assert floor[key + '_std'] == pytest.approx(np.std(values), rel=1e-12, abs=1e-12)
    assert floor['fd_mnist5k_std'] > 0 and (floor['num_samples'], floor['subsets']) == (100, 3)
    # Fewer samples, larger bias: 100 real digits sit well above the 500-digit value.
    assert floor['fd_mnist5k'] > feature_metrics.mnist5k_metrics(
        images[:500], kid_num_subsets=10)['fd_mnist5k']
    with pytest.raises(ValueError, match='3 disjoint sets of 2000 need 6000 images'):
        feature_metrics.real_digit_floor(images, labels, 2000, num_subsets=3)

"""FID / IS math against independent float64 references, and the Flax FID Inception with random
weights written in the PyTorch state-dict .npz layout (no real weights, no network)."""

import jax
import numpy as np
import pytest
import scipy.linalg
import scipy.special

from diffusion_jax.evaluation import fid
from diffusion_jax.evaluation import inception as inc
from reference_inception import resize_bilinear


# ----------------------------------------------------------------------------- references

def _random_spd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or 2 * d))
    return a @ a.T / a.shape[1]


def _reference_fd(mu1, s1, mu2, s2):
    """Independent: Tr sqrt(S1 S2) = Tr sqrt(S2^1/2 S1 S2^1/2), a symmetric PSD matrix whose
    square root comes from its eigenvalues."""
    w, v = np.linalg.eigh(s2)
    s2_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = s2_half @ s1 @ s2_half
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


# ----------------------------------------------------------------------------- FID / IS math

@pytest.mark.parametrize('d', [8, 64])
def test_frechet_distance_matches_reference(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    want = _reference_fd(mu1, s1, mu2, s2)
    assert isinstance(got, float)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-8)
    # Symmetric and ~0 for identical inputs.
    np.testing.assert_allclose(fid.frechet_distance(mu2, s2, mu1, s1), want, rtol=1e-8)
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-8 * np.trace(s1)
    # Pure mean shift with equal covariances.
    np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s1),
                               np.sum((mu1 - mu2) ** 2), rtol=1e-8)


def test_frechet_distance_singular_product():
    rng = np.random.default_rng(1)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d, rank=4), _random_spd(rng, d)  # s1 s2 has rank 4
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    np.testing.assert_allclose(got, _reference_fd(mu1, s1, mu2, s2), rtol=1e-6, atol=1e-6)


def test_frechet_distance_retries_with_offset_when_sqrtm_fails(monkeypatch):
    rng = np.random.default_rng(2)
    d = 8
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d, rank=3), _random_spd(rng, d, rank=3)
    real_sqrtm, calls = scipy.linalg.sqrtm, []

    def flaky_sqrtm(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(fid.scipy.linalg, 'sqrtm', flaky_sqrtm)
    got = fid.frechet_distance(mu1, s1, mu2, s2, eps=1e-6)
    assert len(calls) == 2
    eye = np.eye(d) * 1e-6
    np.testing.assert_allclose(calls[1], (s1 + eye) @ (s2 + eye))
    np.testing.assert_allclose(got, _reference_fd(mu1, s1, mu2, s2), rtol=1e-4, atol=1e-4)


def test_frechet_distance_shape_errors():
    with pytest.raises(ValueError, match='covariances'):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match='mean'):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.mark.parametrize('n,splits', [(500, 10), (103, 10), (50, 1)])
def test_inception_score_matches_reference(n, splits):
    rng = np.random.default_rng(n)
    probs = scipy.special.softmax(3 * rng.normal(size=(n, 1008)), axis=1)
    scores = []
    for i in range(splits):  # improved-gan's loop
        part = probs[(i * n // splits):((i + 1) * n // splits), :]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    mean, std = fid.inception_score(probs, splits=splits)
    np.testing.assert_allclose([mean, std], [np.mean(scores), np.std(scores)], rtol=1e-10)
    assert 1.0 <= mean <= 1008
    # One-hot, uniformly spread predictions: IS = number of classes used.
    onehot = np.eye(20)[np.arange(200) % 20] * (1 - 1e-12) + 1e-12 / 20
    np.testing.assert_allclose(fid.inception_score(onehot, splits=10)[0], 20, rtol=1e-6)


def test_statistics_and_reference_io(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(23, 4, 4, 3), dtype=np.uint8)
    seen = []

    def apply_fn(batch):
        seen.append(batch.shape[0])
        feats = batch.reshape(batch.shape[0], -1)[:, :6].astype(np.float32)
        return dict(pool3=feats, logits=feats)

    mu, sigma = fid.compute_statistics(images, apply_fn, batch_size=5, progress=False)
    feats = images.reshape(23, -1)[:, :6].astype(np.float64)
    np.testing.assert_allclose(mu, feats.mean(0))
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False))
    assert set(seen) == {5}  # last batch padded: one compiled shape

    path = tmp_path / 'ref.npz'
    fid.save_statistics(path, mu, sigma)
    mu2, sigma2 = fid.load_reference(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    np.savez(tmp_path / 'bad.npz', mu=mu, cov=sigma)
    with pytest.raises(ValueError, match="'sigma'"):
        fid.load_reference(tmp_path / 'bad.npz')


def test_resize_matches_torch_bilinear():
    rng = np.random.default_rng(4)
    for h, w, size in [(5, 7, 11), (13, 9, 4)]:  # 32 -> 299: test_network_forward
        x = rng.uniform(0, 255, size=(2, h, w, 3)).astype(np.float32)
        got = np.asarray(inc.resize_bilinear(x, size))
        np.testing.assert_allclose(got, resize_bilinear(x, size), rtol=1e-5, atol=1e-3)


# ----------------------------------------------------------------------------- the network

@pytest.fixture(scope='module')
def fast_compile():
    old = jax.config.values['jax_disable_most_optimizations']
    jax.config.update('jax_disable_most_optimizations', True)
    yield
    jax.config.update('jax_disable_most_optimizations', old)


def _random_params(seed=0):
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in inc.param_shapes().items():
        leaf = path[-1]
        if leaf == 'kernel':
            fan_in = int(np.prod(shape[:-1]))
            gain = 2.0 if path[-2] == 'conv' else 1.0
            value = rng.normal(size=shape) * np.sqrt(gain / fan_in)
        elif leaf in ('scale', 'var'):
            value = rng.uniform(0.5, 1.5, size=shape)
        else:  # bias, mean
            value = rng.normal(size=shape) * 0.1
        flat[path] = value.astype(np.float32)
    return {'params': inc._unflatten(flat)}


@pytest.fixture(scope='module')
def random_weights(tmp_path_factory):
    variables = _random_params()
    state_dict = inc.params_to_state_dict(variables)
    path = tmp_path_factory.mktemp('inception') / 'weights.npz'
    np.savez(path, **state_dict)
    return variables, state_dict, path


def test_state_dict_layout(random_weights):
    _, sd, _ = random_weights
    assert sd['Conv2d_1a_3x3.conv.weight'].shape == (32, 3, 3, 3)
    assert sd['Conv2d_4a_3x3.bn.running_var'].shape == (192,)
    assert sd['Mixed_5b.branch_pool.conv.weight'].shape == (32, 192, 1, 1)
    assert sd['Mixed_6b.branch7x7_2.conv.weight'].shape == (128, 128, 1, 7)
    assert sd['Mixed_6b.branch7x7_3.conv.weight'].shape == (192, 128, 7, 1)
    assert sd['Mixed_7a.branch3x3_2.conv.weight'].shape == (320, 192, 3, 3)
    assert sd['Mixed_7c.branch3x3dbl_3b.conv.weight'].shape == (384, 384, 3, 1)
    assert sd['Mixed_7c.branch_pool.conv.weight'].shape == (192, 2048, 1, 1)
    assert sd['fc.weight'].shape == (1008, 2048) and sd['fc.bias'].shape == (1008,)
    convs = [k for k in sd if k.endswith('.conv.weight')]
    assert len(convs) == 94 and len(sd) == 94 * 5 + 2
    assert not any('AuxLogits' in k for k in sd)


def test_load_params_round_trip(random_weights):
    variables, _, path = random_weights
    loaded = inc.load_params(path)
    flat_a = jax.tree_util.tree_flatten_with_path(variables)[0]
    flat_b = jax.tree_util.tree_flatten_with_path(loaded)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (_, a), (_, b) in zip(flat_a, flat_b):
        assert b.dtype == np.float32
        np.testing.assert_array_equal(a, b)


def test_load_params_bad_files(random_weights, tmp_path):
    _, sd, _ = random_weights
    missing = {k: v for k, v in sd.items() if k != 'Mixed_6c.branch7x7dbl_3.bn.running_mean'}
    np.savez(tmp_path / 'missing.npz', **missing)
    with pytest.raises(ValueError, match=r"missing key 'Mixed_6c\.branch7x7dbl_3\.bn\."
                                         r"running_mean' \(shape \(160,\)\)"):
        inc.load_params(tmp_path / 'missing.npz')

    wrong = dict(sd, **{'fc.weight': np.zeros((1000, 2048), np.float32)})
    np.savez(tmp_path / 'wrong.npz', **wrong)
    with pytest.raises(ValueError, match=r"'fc\.weight' has shape \(1000, 2048\), expected "
                                         r"\(1008, 2048\)"):
        inc.load_params(tmp_path / 'wrong.npz')

    extra = dict(sd, **{'AuxLogits.fc.weight': np.zeros((1008, 768), np.float32),
                        'Conv2d_1a_3x3.bn.num_batches_tracked': np.array(0)})
    np.savez(tmp_path / 'extra.npz', **extra)
    with pytest.raises(ValueError, match=r"unexpected key 'AuxLogits\.fc\.weight'"):
        inc.load_params(tmp_path / 'extra.npz')

    pickled = tmp_path / 'pickled.npz'
    np.savez(pickled, obj=np.array([{'a': 1}], dtype=object))
    with pytest.raises(ValueError):
        inc.load_params(pickled)


def test_network_forward(fast_compile, random_weights):
    _, sd, path = random_weights
    variables = inc.load_params(path)
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    model = inc.InceptionV3()

    @jax.jit
    def run(x):
        return model.apply(variables, x, capture_intermediates=lambda m, _: m.name in (
            'Conv2d_1a_3x3', 'Mixed_7c'))

    out, state = run(images)
    out = {k: np.asarray(v, np.float64) for k, v in out.items()}
    assert out['pool3'].shape == (2, 2048)
    assert out['logits'].shape == out['logits_unbiased'].shape == (2, 1008)
    for v in out.values():
        assert np.isfinite(v).all()
    assert (out['pool3'] >= 0).all() and out['pool3'].std() > 0
    assert not np.allclose(out['pool3'][0], out['pool3'][1])

    inter = state['intermediates']
    assert inter['Mixed_7c']['__call__'][0].shape == (2, 8, 8, 2048)
    np.testing.assert_allclose(out['pool3'], np.asarray(inter['Mixed_7c']['__call__'][0],
                                                        np.float64).mean(axis=(1, 2)),
                               rtol=1e-5, atol=1e-6)
    # fc in PyTorch layout: logits = pool3 W^T + b, unbiased = pool3 W^T.
    w, b = sd['fc.weight'].astype(np.float64), sd['fc.bias'].astype(np.float64)
    scale = np.abs(out['logits']).max()
    np.testing.assert_allclose(out['logits_unbiased'], out['pool3'] @ w.T, atol=1e-5 * scale)
    np.testing.assert_allclose(out['logits'], out['pool3'] @ w.T + b, atol=1e-5 * scale)

    # First BasicConv2d against float64 NumPy: resize -> [-1, 1] -> conv 3x3/2 valid -> BN -> relu.
    x = resize_bilinear(images, 299) * (2 / 255) - 1
    k = sd['Conv2d_1a_3x3.conv.weight'].astype(np.float64)  # OIHW
    y = np.zeros((2, 149, 149, 32))
    for dy in range(3):
        for dx in range(3):
            y += x[:, dy:dy + 297:2, dx:dx + 297:2, :] @ k[:, :, dy, dx].T
    bn = {n: sd[f'Conv2d_1a_3x3.bn.{n}'].astype(np.float64)
          for n in ('weight', 'bias', 'running_mean', 'running_var')}
    y = (y - bn['running_mean']) / np.sqrt(bn['running_var'] + 1e-3) * bn['weight'] + bn['bias']
    y = np.maximum(y, 0)
    got = np.asarray(inter['Conv2d_1a_3x3']['__call__'][0], np.float64)
    assert got.shape == (2, 149, 149, 32)
    np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-4 * np.abs(y).max())

    # compute_statistics / compute_inception_score through the already compiled function.
    apply_fn = lambda batch: run(batch)[0]
    mu, sigma = fid.compute_statistics(images, apply_fn, batch_size=2, progress=False)
    np.testing.assert_allclose(mu, out['pool3'].mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sigma, np.cov(out['pool3'], rowvar=False), rtol=1e-5, atol=1e-9)
    is_mean, is_std = fid.compute_inception_score(images, apply_fn, batch_size=2, splits=1,
                                                  progress=False)
    probs = scipy.special.softmax(out['logits_unbiased'], axis=1)
    np.testing.assert_allclose([is_mean, is_std], fid.inception_score(probs, splits=1), rtol=1e-5)


def test_tf_style_pooling():
    x = np.arange(2 * 5 * 6 * 3, dtype=np.float32).reshape(2, 5, 6, 3) - 90
    got = np.asarray(inc._avg_pool_same(x))
    padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    ones = np.pad(np.ones_like(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    win = lambda a: sum(a[:, i:i + 5, j:j + 6] for i in range(3) for j in range(3))
    np.testing.assert_allclose(got, win(padded) / win(ones), rtol=1e-6)  # padding not counted
    np.testing.assert_allclose(got[:, 0, 0], x[:, :2, :2].mean(axis=(1, 2)), rtol=1e-6)
    pooled = np.asarray(inc._max_pool_valid(x))
    assert pooled.shape == (2, 2, 2, 3)
    np.testing.assert_array_equal(pooled[:, 1, 1], x[:, 2:5, 2:5].max(axis=(1, 2)))


def test_eval_mode_inception_metrics_of_samples(fast_compile, random_weights, tmp_path):
    """--mode=eval's sample-quality step with Inception weights and reference statistics set:
    one-channel samples are repeated to RGB, FID and IS match the float64 references."""
    from configs import tiny
    from diffusion_jax import evaluate
    variables, _, weights_path = random_weights
    rng = np.random.default_rng(7)
    samples = rng.integers(0, 256, size=(6, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / 'samples.npz', images=samples)
    mu_ref, sigma_ref = rng.normal(size=2048), _random_spd(rng, 2048, rank=64)
    fid.save_statistics(tmp_path / 'ref.npz', mu_ref, sigma_ref)
    config = tiny.get_config()
    config.eval.inception_weights = str(weights_path)
    config.eval.fid_reference = str(tmp_path / 'ref.npz')
    config.eval.inception_batch_size = 4  # Two batches, the second padded.
    config.eval.inception_splits = 1
    metrics = evaluate._sample_quality(config, str(tmp_path))

    out = jax.jit(inc.InceptionV3().apply)(variables, np.repeat(samples, 3, axis=-1))
    pool3 = np.asarray(out['pool3'], np.float64)
    probs = scipy.special.softmax(np.asarray(out['logits_unbiased'], np.float64), axis=1)
    expected_fd = _reference_fd(pool3.mean(0), np.cov(pool3, rowvar=False), mu_ref, sigma_ref)
    np.testing.assert_allclose(metrics['fid'], expected_fd, rtol=1e-4)
    p_y = probs.mean(axis=0)
    expected_is = np.exp(np.mean(np.sum(probs * (np.log(probs) - np.log(p_y)), axis=1)))
    assert metrics['num_samples'] == 6
    assert metrics['inception_score'] == pytest.approx(expected_is, rel=1e-4)
    with pytest.raises(ValueError, match='uint8'):
        fid.inception_metrics(samples[..., 0], weights_path)


# ----------------------------------------------------------------------------- reference files

def test_published_reference_layouts_read(tmp_path):
    """pytorch-fid's published statistics hold `mu` and `sigma` only; guided-diffusion's
    evaluator batches add the images (`arr_0`) and spatial statistics (`mu_s`, `sigma_s`)."""
    rng = np.random.default_rng(11)
    mu, sigma = rng.normal(size=16), _random_spd(rng, 16)
    np.savez(tmp_path / 'fid_stats_cifar10_train.npz', mu=mu.astype(np.float32),
             sigma=sigma.astype(np.float32))
    np.savez(tmp_path / 'VIRTUAL_cifar10.npz',
             arr_0=rng.integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8), mu=mu, sigma=sigma,
             mu_s=rng.normal(size=7), sigma_s=_random_spd(rng, 7))
    for name, rtol in (('fid_stats_cifar10_train.npz', 1e-6), ('VIRTUAL_cifar10.npz', 0)):
        got_mu, got_sigma = fid.load_reference(tmp_path / name)
        assert got_mu.dtype == got_sigma.dtype == np.float64
        np.testing.assert_allclose(got_mu, mu, rtol=rtol, atol=1e-6)
        np.testing.assert_allclose(got_sigma, sigma, rtol=rtol, atol=1e-6)


def test_reference_statistics_of_a_folder_are_computed_once(fast_compile, random_weights,
                                                            tmp_path, monkeypatch):
    from configs import folder as folder_config
    from diffusion_jax.data import folder as folder_lib
    from diffusion_jax.data import pipeline
    from diffusion_jax.evaluation import reference_stats
    from test_folder import write_folder
    variables, _, weights_path = random_weights
    root = write_folder(tmp_path / 'images')
    config = folder_config.get_config()
    config.data.update(folder=str(root), image_size=8, channels=1,
                       data_dir=str(tmp_path / 'tfds'))
    config.eval.update(inception_weights=str(weights_path), fid_reference_images=9,
                       inception_batch_size=4)
    path = reference_stats.ensure_reference(config)
    with np.load(path) as stats:
        assert int(stats['num_images']) == 9 and str(stats['split']) == 'train'
        assert str(stats['dataset']).startswith('folder_8px_1ch_')
    train_images, _ = pipeline.load_split(
        'folder', 'train', data_dir=config.data.data_dir,
        builder_config=folder_lib.folder_config(str(root), image_size=8, channels=1))
    out = jax.jit(inc.InceptionV3().apply)(variables, np.repeat(train_images[:9], 3, axis=-1))
    pool3 = np.asarray(out['pool3'], np.float64)
    mu, sigma = fid.load_reference(path)
    np.testing.assert_allclose(mu, pool3.mean(0), rtol=1e-4, atol=1e-5 * np.abs(pool3).max())
    np.testing.assert_allclose(sigma, np.cov(pool3, rowvar=False), rtol=1e-3,
                               atol=1e-4 * np.abs(sigma).max())
    # Cached: the second call computes nothing, and --mode=eval's FID uses the cached file.
    monkeypatch.setattr(fid, 'compute_statistics', lambda *a, **k: pytest.fail('recomputed'))
    assert reference_stats.ensure_reference(config) == path
    from diffusion_jax import evaluate
    samples = np.random.default_rng(3).integers(0, 256, size=(5, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / 'samples.npz', images=samples)
    config.eval.inception_splits = 1
    metrics = evaluate._sample_quality(config, str(tmp_path))
    out = jax.jit(inc.InceptionV3().apply)(variables, np.repeat(samples, 3, axis=-1))
    feats = np.asarray(out['pool3'], np.float64)
    expected = _reference_fd(feats.mean(0), np.cov(feats, rowvar=False), mu, sigma)
    np.testing.assert_allclose(metrics['fid'], expected, rtol=1e-4)
    config.eval.fid_reference_images = 8  # Another N is another file.
    assert reference_stats.reference_path(config) != path


def test_reference_statistics_command_prints_the_cached_file(random_weights, tmp_path):
    from conftest import run_python
    from test_folder import write_folder
    _, _, weights_path = random_weights
    root = write_folder(tmp_path / 'images')
    result = run_python(['-m', 'diffusion_jax.evaluation.reference_stats',
                         '--config=configs/folder.py', f'--config.data.folder={root}',
                         '--config.data.image_size=8', '--config.data.channels=1',
                         f'--config.data.data_dir={tmp_path / "tfds"}',
                         f'--config.eval.inception_weights={weights_path}',
                         '--config.eval.fid_reference_images=4',
                         '--config.eval.inception_batch_size=4'], fast_compiles=True)
    path = result.stdout.strip().splitlines()[-1]
    assert path.startswith(str(tmp_path / 'tfds' / 'fid_reference')) and path.endswith('.npz')
    mu, sigma = fid.load_reference(path)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and np.isfinite(sigma).all()
    with np.load(path) as stats:
        assert int(stats['num_images']) == 4


def test_whole_network_matches_a_float64_numpy_forward(fast_compile, random_weights):
    """Every layer at once: the whole FID Inception (resize, all 94 convolutions, the pools of
    each block, pool3 and the 1008 logits) against `reference_inception`, a float64 NumPy
    forward written from the network's description, with the same random weights, on random
    images of an odd size. (pytorch-fid and torch-fidelity need torchvision, whose PyPI wheel
    here is a CUDA build that does not load without the CUDA libraries.)"""
    from reference_inception import Reference
    variables, state_dict, _ = random_weights
    images = np.random.default_rng(13).integers(0, 256, size=(2, 37, 45, 3), dtype=np.uint8)
    expected = Reference(state_dict)(images)
    got = jax.jit(inc.InceptionV3().apply)(variables, images)
    for key in ('pool3', 'logits'):
        ours = np.asarray(got[key], np.float64)
        error = np.linalg.norm(ours - expected[key]) / np.linalg.norm(expected[key])
        print(f'{key}: relative error {error:.2e} against the float64 forward, max abs '
              f'{np.abs(ours - expected[key]).max():.2e} of max {np.abs(expected[key]).max():.2e}')
        assert error <= 1e-5, key  # Measured: 2.5e-7 (pool3), 4.4e-7 (logits).
    # Not vacuous: the two images' features differ by far more than the tolerance.
    assert np.linalg.norm(expected['pool3'][0] - expected['pool3'][1]) > 1e-2 * np.linalg.norm(
        expected['pool3'][0])

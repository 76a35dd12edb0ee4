"""Guidance and editing against float64 references: classifier guidance in the ancestral and DDIM
steps (Dhariwal & Nichol 2021, Algorithms 1-2), the classifier's gradient against finite
differences, classifier-free guidance (Ho & Salimans 2022, eq. 6) and its w = 0 limit, label
dropout, and SDEdit (Meng et al. 2022): t0 = 0, the masked known region and the stroke input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import losses
from diffusion_jax import sde as sde_lib
from diffusion_jax.diffusion import Diffusion
from diffusion_jax.models import NoisyClassifier, UNet
from diffusion_jax.sampling import ddim, editing, guidance
from diffusion_jax.sampling.ancestral import reverse_chain, reverse_steps
from diffusion_jax.schedules import get_beta_schedule

try:
    from tests import reference_ddpm as ref
except ImportError:  # pragma: no cover
    import reference_ddpm as ref

pytestmark = pytest.mark.usefixtures('fast_compiles')

T = 40
SHAPE = (3, 4, 4, 2)
SMALL_NET = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                 num_groups=4)


def toy_eps(params, x, t):
    """ε(x, t) = a x + b t / T: a "network" with an exact NumPy twin."""
    return params['a'] * x + params['b'] * t[:, None, None, None] / T


def toy_gradient(params, x, t):
    """A stand-in for s ∇ log p(y | x_t): s tanh(x + t / T)."""
    return params['guidance_scale'] * jnp.tanh(x + t[:, None, None, None] / T)


def toy_gradient_np(p, x, t):
    return p['guidance_scale'] * np.tanh(x + np.asarray(t, np.float64)[:, None, None, None] / T)


def toy_params(seed):
    rng = np.random.default_rng(seed)
    values = {k: float(np.float32(v)) for k, v in dict(
        a=rng.uniform(0.6, 1.2), b=rng.uniform(-1, 1), guidance_scale=rng.uniform(1, 3)).items()}
    return {k: jnp.float32(v) for k, v in values.items()}, values


def process(var_type='fixedlarge'):
    betas = get_beta_schedule('linear', T, beta_start=1e-3, beta_end=0.2)
    return Diffusion.create(betas, var_type=var_type), ref.Process(betas)


def step_noise(rng, t, shape):
    return np.asarray(jax.random.normal(jax.random.fold_in(rng, t), shape), np.float64)


# -------------------------------------------------------------------------------------------------
# Classifier guidance in the samplers
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('var_type', ['fixedlarge', 'fixedsmall'])
def test_guided_ancestral_chain_shifts_the_mean_by_sigma_times_gradient(var_type):
    diffusion, proc = process(var_type)
    params, p = toy_params(0)
    rng = jax.random.key(1)
    x_start = np.random.default_rng(2).standard_normal(SHAPE)
    x, _ = reverse_steps(toy_eps, params, diffusion, jnp.asarray(x_start, jnp.float32), rng,
                         jnp.int32(T - 1), num_steps=T, guidance_fn=toy_gradient)
    expected = x_start
    for t in range(T - 1, -1, -1):  # Dhariwal & Nichol Algorithm 1: x ~ N(μ + s Σ ∇ log p, Σ).
        tb = np.full(SHAPE[0], t)
        out = ref.p_mean_variance(proc, p['a'] * expected + p['b'] * t / T, expected, tb, 'eps',
                                  var_type, True)
        mean = out['mean'] + out['variance'] * toy_gradient_np(p, expected, tb)
        expected = mean + (t > 0) * np.exp(0.5 * out['log_variance']) * step_noise(rng, t, SHAPE)
    np.testing.assert_allclose(np.asarray(x), expected, rtol=1e-4, atol=1e-4)
    unguided, _ = reverse_steps(toy_eps, params, diffusion, jnp.asarray(x_start, jnp.float32),
                                rng, jnp.int32(T - 1), num_steps=T)
    assert np.abs(np.asarray(unguided) - expected).max() > 0.1  # The guidance term matters.


@pytest.mark.parametrize('eta', [0.0, 1.0])
def test_guided_ddim_step_uses_the_shifted_noise(eta):
    diffusion, proc = process('fixedsmall')
    params, p = toy_params(3)
    rng = jax.random.key(4)
    levels = ddim.timestep_sequence(T, 8, 'trailing')[::-1]
    x_start = np.random.default_rng(5).standard_normal(SHAPE)
    x, _ = ddim.ddim_sample(toy_eps, params, diffusion, rng, SHAPE, num_steps=8, eta=eta,
                            spacing='trailing', x_T=jnp.asarray(x_start, jnp.float32),
                            guidance_fn=toy_gradient)
    expected = x_start
    for t, s in zip(levels, list(levels[1:]) + [-1]):  # Dhariwal & Nichol Algorithm 2.
        tb = np.full(SHAPE[0], t)
        pred_x0 = ref.p_mean_variance(proc, p['a'] * expected + p['b'] * t / T, expected, tb,
                                      'eps', 'fixedsmall', True)['pred_x0']
        eps = ref.eps_from_x0(proc, expected, tb, pred_x0)
        eps = eps - np.sqrt(1.0 - proc.abar[t]) * toy_gradient_np(p, expected, tb)
        pred_x0 = ref.x0_from_eps(proc, expected, tb, eps)
        expected = ref.ddim_step(proc, expected, t, s, pred_x0, eta, step_noise(rng, t, SHAPE))
    np.testing.assert_allclose(np.asarray(x), expected, rtol=1e-4, atol=1e-4)


def test_classifier_gradient_matches_finite_differences():
    """s ∇_x log p(y | x_t, t) of the noise-aware classifier against central differences of
    its float64 log-probability, sample by sample (a direction that moves one sample only)."""
    diffusion, _ = process()
    with jax.enable_x64(True):
        classifier = NoisyClassifier(num_classes=5, dtype=jnp.float64, **SMALL_NET)
        rng = np.random.default_rng(6)
        x = jnp.asarray(rng.standard_normal((3, 8, 8, 1)))
        t = jnp.asarray([3, 17, 39])
        params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), classifier.init(
            jax.random.key(7), x, t)['params'])
        # Non-trivial logits: the zero-initialised layers are not zero here.
        params = jax.tree.map(lambda v: v + 0.3 * jnp.asarray(
            rng.standard_normal(v.shape)), params)
        labels = jnp.asarray([4, 0, 2])
        bundle = dict(classifier=params, labels=labels, guidance_scale=jnp.float64(2.5))
        grad = np.asarray(guidance.classifier_gradient(classifier, diffusion)(bundle, x, t))

        def log_prob(x, i):
            logits = classifier.apply({'params': params}, x, diffusion.time_label(t))
            return float(jax.nn.log_softmax(logits)[i, labels[i]])

        h = 1e-5
        for i in range(3):
            direction = np.zeros(x.shape)
            direction[i] = rng.standard_normal(x.shape[1:])
            numeric = (log_prob(x + h * direction, i) - log_prob(x - h * direction, i)) / (2 * h)
            assert abs(2.5 * numeric - np.sum(grad * direction)) < 1e-6 * max(1.0, abs(numeric))
            # And the sample's gradient does not leak into the others'.
            other = (i + 1) % 3
            assert abs(log_prob(x + h * direction, other) - log_prob(x, other)) < 1e-12


# -------------------------------------------------------------------------------------------------
# Classifier-free guidance
# -------------------------------------------------------------------------------------------------


@functools.cache
def conditional_unet():
    model = UNet(out_ch=1, num_classes=3, **SMALL_NET)
    x, t, y = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32)
    params = model.init(jax.random.key(8), x, t, y=y)['params']
    rng = np.random.default_rng(9)  # Perturbed: the output layer starts at zero.
    params = jax.tree.map(lambda v: v + 0.2 * rng.standard_normal(v.shape).astype(v.dtype), params)
    return model, params


def test_classifier_free_combination_matches_reference():
    model, params = conditional_unet()
    rng = np.random.default_rng(10)
    x = jnp.asarray(rng.standard_normal((4, 8, 8, 1)), jnp.float32)
    t = jnp.asarray([0, 5, 13, 19])
    labels = jnp.asarray([0, 2, 1, 2])
    w = 1.7
    out = guidance.classifier_free_apply(model)(
        dict(params=params, labels=labels, guidance_scale=jnp.float32(w)), x, t)
    cond = np.asarray(model.apply({'params': params}, x, t, y=labels), np.float64)
    uncond = np.asarray(model.apply({'params': params}, x, t, y=jnp.full((4,), 3)), np.float64)
    assert np.abs(cond - uncond).max() > 1e-2  # The label changes the output.
    np.testing.assert_allclose(np.asarray(out), (1 + w) * cond - w * uncond, rtol=1e-4,
                               atol=1e-4)


def test_classifier_free_guidance_at_w0_is_the_conditional_sampler():
    model, params = conditional_unet()
    diffusion = Diffusion.create(get_beta_schedule('linear', 10))
    x_T = jax.random.normal(jax.random.key(11), (4, 8, 8, 1))
    labels = jnp.asarray([0, 1, 2, 1])
    bundle = dict(params=params, labels=labels, guidance_scale=jnp.float32(0.0))
    guided, _ = reverse_chain(guidance.classifier_free_apply(model), bundle, diffusion, x_T,
                              jax.random.key(12), t_start=9)
    conditional, _ = reverse_chain(guidance.conditioned_apply(model), bundle, diffusion, x_T,
                                   jax.random.key(12), t_start=9)
    np.testing.assert_allclose(np.asarray(guided), np.asarray(conditional), atol=1e-5)
    other, _ = reverse_chain(guidance.classifier_free_apply(model),
                             dict(bundle, guidance_scale=jnp.float32(2.0)), diffusion, x_T,
                             jax.random.key(12), t_start=9)
    assert np.abs(np.asarray(other) - np.asarray(conditional)).max() > 1e-3


def test_label_dropout_rate_and_null_label():
    labels = jnp.asarray(np.random.default_rng(13).integers(0, 10, 200_000))
    dropped = np.asarray(losses.drop_labels(jax.random.key(14), labels, 10, 0.1))
    is_null = dropped == 10
    assert abs(is_null.mean() - 0.1) < 0.004  # 6 standard errors of a binomial mean.
    np.testing.assert_array_equal(dropped[~is_null], np.asarray(labels)[~is_null])
    assert np.all(np.asarray(losses.drop_labels(jax.random.key(14), labels, 10, 1.0)) == 10)
    np.testing.assert_array_equal(
        np.asarray(losses.drop_labels(jax.random.key(14), labels, 10, 0.0)), labels)


def test_conditional_unet_checks_its_labels():
    model, params = conditional_unet()
    x, t = jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match=r'needs labels y of shape \[B\] = \(2,\)'):
        model.apply({'params': params}, x, t)
    with pytest.raises(ValueError, match='labels y were given to an unconditional network'):
        UNet(out_ch=1, **SMALL_NET).init(jax.random.key(0), x, t, y=jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match='needs a class-conditional U-Net'):
        guidance.classifier_free_apply(UNet(out_ch=1, **SMALL_NET))


def test_classifier_loss_is_the_cross_entropy_on_noised_images():
    diffusion, proc = process()
    classifier = NoisyClassifier(num_classes=4, **SMALL_NET)
    rng = np.random.default_rng(15)
    x0 = rng.uniform(-1, 1, (5, 8, 8, 1)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = jnp.asarray(rng.integers(0, T, 5))
    labels = jnp.asarray(rng.integers(0, 4, 5))
    params = classifier.init(jax.random.key(16), x0, t)['params']
    params = jax.tree.map(lambda v: v + 0.2 * rng.standard_normal(v.shape).astype(v.dtype), params)
    loss, metrics = losses.make_classifier_loss(classifier, diffusion)(
        params, dict(image=x0, label=labels), t, noise, jax.random.key(0))
    x_t = ref.q_sample(proc, x0.astype(np.float64), np.asarray(t), noise.astype(np.float64))
    logits = np.asarray(classifier.apply({'params': params}, jnp.asarray(x_t, jnp.float32), t),
                        np.float64)
    log_probs = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                       keepdims=True)) - logits.max(-1, keepdims=True)
    expected = -np.mean(log_probs[np.arange(5), np.asarray(labels)])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
    assert float(metrics['accuracy']) == np.mean(logits.argmax(-1) == np.asarray(labels))


def test_sample_labels():
    np.testing.assert_array_equal(guidance.sample_labels('cycle', 7, 3, None),
                                  [0, 1, 2, 0, 1, 2, 0])
    np.testing.assert_array_equal(guidance.sample_labels('1,7', 5, 10, None), [1, 7, 1, 7, 1])
    drawn = guidance.sample_labels('random', 1000, 4, jax.random.key(0))
    assert set(drawn.tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match='outside 0..9'):
        guidance.sample_labels('3,10', 4, 10, None)
    with pytest.raises(ValueError, match="'cycle', 'random' or comma-separated"):
        guidance.sample_labels('sevens', 4, 10, None)


# -------------------------------------------------------------------------------------------------
# SDEdit
# -------------------------------------------------------------------------------------------------


def test_sdedit_at_t0_zero_returns_the_guide():
    diffusion, _ = process()
    vp = sde_lib.get_sde('vp', num_scales=20)
    params, _ = toy_params(17)
    guide = np.random.default_rng(18).uniform(-1, 1, SHAPE).astype(np.float32)
    for proc in (diffusion, vp):
        out = editing.sdedit(toy_eps, params, proc, guide, jax.random.key(19), t0=0.0, repeats=2)
        assert out.shape == (2,) + SHAPE
        np.testing.assert_array_equal(np.asarray(out[0]), guide)
        np.testing.assert_array_equal(np.asarray(out[1]), guide)
    assert editing.start_index(diffusion, 0.5) == T // 2
    times = np.asarray(vp.timesteps())
    k = editing.start_index(vp, 0.5)
    assert times[k] <= 0.5 < times[k - 1]
    with pytest.raises(ValueError, match=r'edit.t0 must be in \[0, 1\]'):
        editing.start_index(diffusion, 1.5)
    with pytest.raises(ValueError, match='edit.repeats must be a positive integer, got 0'):
        editing.sdedit(toy_eps, params, diffusion, guide, jax.random.key(19), t0=0.5, repeats=0)


def test_sdedit_starts_from_the_noised_guide_and_runs_the_remaining_steps():
    diffusion, proc = process('fixedsmall')
    params, p = toy_params(20)
    guide = np.random.default_rng(21).uniform(-1, 1, SHAPE)
    rng = jax.random.key(22)
    out = editing.sdedit(toy_eps, params, diffusion, guide, rng, t0=0.25, repeats=1)
    n = round(0.25 * T)
    round_rng = jax.random.fold_in(rng, 0)
    z = np.asarray(jax.random.normal(jax.random.fold_in(round_rng, 2 ** 32 - 1), SHAPE),
                   np.float64)
    x = ref.q_sample(proc, guide, np.full(SHAPE[0], n - 1), z)
    for t in range(n - 1, -1, -1):
        tb = np.full(SHAPE[0], t)
        x, _ = ref.p_sample(proc, p['a'] * x + p['b'] * t / T, x, tb,
                            step_noise(round_rng, t, SHAPE), 'eps', 'fixedsmall', True)
    np.testing.assert_allclose(np.asarray(out[0]), x, rtol=1e-4, atol=1e-4)


def test_masked_reverse_step_pins_the_known_region_at_the_new_level():
    diffusion, proc = process()
    params, _ = toy_params(23)
    rng = jax.random.key(24)
    data = np.random.default_rng(25)
    guide = data.uniform(-1, 1, SHAPE)
    mask = (data.uniform(size=SHAPE) < 0.5).astype(np.float32)
    x_t = jnp.asarray(data.standard_normal(SHAPE), jnp.float32)
    known = dict(image=jnp.asarray(guide, jnp.float32), mask=jnp.asarray(mask))
    t = 12
    x, _ = reverse_steps(toy_eps, params, diffusion, x_t, rng, jnp.int32(t), num_steps=1,
                         known=known)
    free, _ = reverse_steps(toy_eps, params, diffusion, x_t, rng, jnp.int32(t), num_steps=1)
    z = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.fold_in(rng, t), 1), SHAPE))
    level = ref.q_sample(proc, guide, np.full(SHAPE[0], t - 1), z)  # q(x_{t-1} | guide)
    x, free = np.asarray(x), np.asarray(free)
    np.testing.assert_allclose(x[mask == 1], level[mask == 1], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(x[mask == 0], free[mask == 0])
    # A whole masked edit ends on the guide itself wherever the mask is 1.
    for proc_ in (diffusion, sde_lib.get_sde('vp', num_scales=20)):
        out = editing.sdedit(toy_eps, params, proc_, guide, rng, t0=0.6, mask=mask)
        np.testing.assert_array_equal(np.asarray(out[0])[mask == 1],
                                      guide.astype(np.float32)[mask == 1])
        assert np.abs(np.asarray(out[0])[mask == 0] - guide[mask == 0]).max() > 1e-2


def test_blocky_strokes_against_a_loop():
    images = np.random.default_rng(26).uniform(-1, 1, (2, 8, 12, 1))
    strokes = editing.blocky_strokes(images, block=4)
    for b in range(2):
        for i in range(8):
            for j in range(12):
                tile = images[b, i // 4 * 4:i // 4 * 4 + 4, j // 4 * 4:j // 4 * 4 + 4, 0]
                assert strokes[b, i, j, 0] == (1.0 if tile.mean() > 0 else -1.0)
    with pytest.raises(ValueError, match='not divisible by the block size 5'):
        editing.blocky_strokes(images, block=5)


def test_guide_images_load_from_png_grids_and_npz_with_clear_errors(tmp_path):
    from diffusion_jax import images
    guides = np.random.default_rng(27).integers(0, 256, (5, 8, 8, 1)).astype(np.uint8)
    images.save_png(tmp_path / 'grid.png', images.make_grid(guides, ncol=5))
    images.save_png(tmp_path / 'one.png', guides[0])
    np.savez(tmp_path / 'g.npz', images=guides)
    np.testing.assert_array_equal(
        images.load_images(str(tmp_path / 'grid.png'), image_size=8, channels=1), guides)
    np.testing.assert_array_equal(
        images.load_images(str(tmp_path / 'one.png'), image_size=8, channels=1), guides[:1])
    np.testing.assert_array_equal(
        images.load_images(str(tmp_path / 'g.npz'), image_size=8, channels=1), guides)
    with pytest.raises(ValueError, match=r'expected images of shape \[N, 16, 16, 1\]'):
        images.load_images(str(tmp_path / 'g.npz'), image_size=16, channels=1)
    with pytest.raises(ValueError, match='neither one 6x6 image nor a grid'):
        images.load_images(str(tmp_path / 'grid.png'), image_size=6, channels=1)
    np.savez(tmp_path / 'bad.npz', pictures=guides)
    with pytest.raises(ValueError, match='has no `images` array'):
        images.load_images(str(tmp_path / 'bad.npz'), image_size=8, channels=1)

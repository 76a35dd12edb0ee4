"""Dual-output diffusion (Benny & Wolf 2022) in `Diffusion`: x̂_0, the loss and its gradients
against the float64 reference, and the r ≡ 0 / r ≡ 1 limits against the single-output samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import train
from diffusion_jax.diffusion import Diffusion
from diffusion_jax.sampling import ancestral_sample, ddim_sample
from diffusion_jax.schedules import get_beta_schedule

try:
    from tests import reference_ddpm as ref
except ImportError:  # pragma: no cover
    import reference_ddpm as ref

T = 100
SHAPE = (4, 3, 3, 2)


pytestmark = pytest.mark.usefixtures('fast_compiles')


def _diffusion(mean_type, var_type='fixedlarge', loss_type='mse'):
    return Diffusion.create(get_beta_schedule('linear', T), mean_type=mean_type,
                            var_type=var_type, loss_type=loss_type)


def _batch(seed, out_groups=3):
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-1, 1, SHAPE)
    noise = rng.standard_normal(SHAPE)
    t = rng.integers(0, T, SHAPE[0])
    out = rng.standard_normal(SHAPE[:-1] + (out_groups * SHAPE[-1],))
    out[..., 2 * SHAPE[-1]:3 * SHAPE[-1]] *= 3.0  # logits spread over sigmoid's range
    return [np.asarray(a, np.float32) for a in (x0, noise, out)] + [t.astype(np.int32)]


@pytest.mark.parametrize('clip', [True, False])
def test_dual_p_mean_variance_matches_reference(clip):
    x0, noise, out, t = _batch(0)
    proc = ref.Process(ref.beta_schedule('linear', T))
    diffusion = _diffusion('dual')
    x_t = np.asarray(diffusion.q_sample(x0, t, noise))
    got = diffusion.p_mean_variance(jnp.asarray(out), x_t, t, clip)
    want = ref.p_mean_variance(proc, out, x_t.astype(np.float64), t, 'dual', 'fixedlarge', clip)
    for key in ('pred_x0', 'mean'):
        scale = 1.0 + np.max(np.abs(want[key]))
        np.testing.assert_allclose(got[key], want[key], atol=2e-5 * scale, err_msg=key)


def test_dual_loss_and_gradients_match_reference():
    """The loss value, and each head's gradient: ε_θ and x_θ only from their own squared errors,
    the logit only through the combined x̂_0 (ε_θ, x_θ frozen there)."""
    x0, noise, out, t = _batch(1)
    proc = ref.Process(ref.beta_schedule('linear', T))
    diffusion = _diffusion('dual')
    x_t = np.asarray(diffusion.q_sample(x0, t, noise))

    def loss(model_output):
        return jnp.sum(diffusion.training_losses(model_output, x0, x_t, t, noise))

    value, grad = jax.value_and_grad(loss)(jnp.asarray(out))
    want_losses, want_grad = ref.dual_loss_and_grad(proc, out.astype(np.float64), x0, x_t, t,
                                                    noise)
    np.testing.assert_allclose(value, np.sum(want_losses), rtol=2e-5)
    c = SHAPE[-1]
    for k, head in enumerate(('eps', 'x0', 'logit')):
        sl = slice(k * c, (k + 1) * c)
        scale = np.max(np.abs(want_grad[..., sl]))
        assert scale > 0, head
        np.testing.assert_allclose(grad[..., sl], want_grad[..., sl], atol=1e-4 * scale,
                                   err_msg=head)


def _limit_apply(logit):
    """A dual "network" whose ε and x_0 heads are the toy functions of the single-output tests
    and whose logit is a constant (±inf: r ≡ 1 or r ≡ 0)."""
    def apply(params, x, t):
        eps = params['a'] * x + params['b'] * t[:, None, None, None] / T
        return jnp.concatenate([eps, 0.9 * eps - 0.1, jnp.full_like(x, logit)], axis=-1)
    return apply


def _single_apply(head):
    def apply(params, x, t):
        eps = params['a'] * x + params['b'] * t[:, None, None, None] / T
        return eps if head == 'eps' else 0.9 * eps - 0.1
    return apply


PARAMS = dict(a=jnp.float32(0.8), b=jnp.float32(-0.4))


@pytest.mark.parametrize('logit, single', [(-np.inf, 'eps'), (np.inf, 'x0')])
def test_r_limits_reproduce_the_single_output_samplers_exactly(logit, single):
    rng, shape = jax.random.key(3), (2, 4, 4, 1)
    dual, one = _diffusion('dual'), _diffusion(single)
    for sample in (lambda d, f: ancestral_sample(f, PARAMS, d, rng, shape)[0],
                   lambda d, f: ddim_sample(f, PARAMS, d, rng, shape, num_steps=10, eta=0.5)[0]):
        got = sample(dual, _limit_apply(logit))
        want = sample(one, _single_apply(single))
        np.testing.assert_array_equal(got, want)
    # With a finite logit the result differs from both (the test can tell them apart).
    mixed = ancestral_sample(_limit_apply(0.0), PARAMS, dual, rng, shape)[0]
    assert np.max(np.abs(mixed - ancestral_sample(_single_apply(single), PARAMS, one, rng,
                                                  shape)[0])) > 1e-2


def test_dual_output_channels_from_config():
    from configs import tiny
    config = tiny.get_config()
    config.diffusion.mean_type = 'dual'
    with pytest.raises(ValueError, match=r"mean_type 'dual'.*need 3: set --config.model.out_ch=3"):
        train.make_model(config)
    config.model.out_ch = 3
    assert train.make_model(config).out_ch == 3
    config.diffusion.var_type, config.diffusion.loss_type = 'learned_range', 'hybrid'
    with pytest.raises(ValueError, match='need 4'):
        train.make_model(config)
    diffusion = train.make_diffusion(config.diffusion)
    assert diffusion.output_groups == 4
    x = jnp.zeros((1, 8, 8, 1))
    with pytest.raises(ValueError, match="mean_type 'dual' and var_type 'learned_range'"):
        diffusion.p_mean_variance(jnp.zeros((1, 8, 8, 3)), x, jnp.zeros((1,), jnp.int32))

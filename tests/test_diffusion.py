"""The process math of `diffusion_jax.diffusion` against the float64 reference `reference_ddpm`.

Inputs are drawn from seeded NumPy generators and handed to the JAX code as float32; every
comparison is made in float64 against the reference evaluated on the same float32 values. Each
batch mixes t = 0, t = 1, t = T - 1 and random timesteps. The achieved max errors quoted in the
comments are from jax 0.10.2 on CPU.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion as dj
from diffusion_jax.diffusion import Diffusion
from diffusion_jax.schedules import get_beta_schedule

try:  # `tests` is not a package: import the reference by either route pytest may set up.
    from tests import reference_ddpm as ref
except ImportError:  # pragma: no cover
    import reference_ddpm as ref

MEAN_TYPES = ('eps', 'x0', 'xprev')
VAR_TYPES = ('fixedlarge', 'fixedsmall', 'learned', 'learned_range')
LEARNED = ('learned', 'learned_range')
B, H, W, C = 8, 4, 4, 3
F64 = np.float64


# -------------------------------------------------------------------------------------------------
# Fixtures and helpers
# -------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def process(schedule='linear', T=1000):
    return ref.Process(ref.beta_schedule(schedule, T))


@functools.lru_cache(maxsize=None)
def betas(schedule='linear', T=1000):
    return get_beta_schedule(schedule, T)


def make(mean_type='eps', var_type='fixedlarge', loss_type='kl', schedule='linear', T=1000):
    return Diffusion.create(betas(schedule, T), mean_type=mean_type, var_type=var_type,
                            loss_type=loss_type)


def f64(x):
    return np.asarray(x, dtype=F64)


def assert_close(actual, expected, rtol, atol, what=''):
    """|actual - expected| <= atol + rtol |expected| elementwise, in float64.

    `atol` may be an array (a tolerance scaled by the conditioning of each element); `actual` may be
    broadcastable to `expected` (e.g. a [B, 1, 1, 1] variance).
    """
    actual = f64(actual)
    expected = f64(expected)
    if actual.shape != expected.shape:
        assert np.broadcast_shapes(actual.shape, expected.shape) == expected.shape, what
        actual = np.broadcast_to(actual, expected.shape)
    assert np.all(np.isfinite(actual)), f'{what}: non-finite values'
    err = np.abs(actual - expected)
    tol = np.broadcast_to(atol + rtol * np.abs(expected), expected.shape)
    bad = err > tol
    rel = err / np.maximum(np.abs(expected), 1e-300)
    if np.any(bad):
        i = np.unravel_index(np.argmax(np.where(bad, err / np.maximum(tol, 1e-300), 0)), err.shape)
        raise AssertionError(
            f'{what}: {bad.sum()} / {bad.size} elements off; worst at {i}: actual {actual[i]!r}, '
            f'expected {expected[i]!r}, tolerance {tol[i]:.3g}; max abs err {err.max():.3g}, '
            f'max rel err {rel.max():.3g}')
    print(f'ERR {what}: max abs {err.max():.2e}, max rel {rel.max():.2e}, '
          f'max err/tol {np.max(err / np.maximum(tol, 1e-300)):.2f}')


class Batch:
    """A data batch on the 256-level grid (with exact -1 and 1 in every image), noise, x_t."""

    def __init__(self, seed, proc):
        self.rng = np.random.default_rng(seed)
        T = proc.T
        self.t = np.concatenate(
            [[0, T - 1, 1], self.rng.integers(2, T - 1, size=B - 3)]).astype(np.int32)
        x0 = self.rng.integers(0, 256, size=(B, H, W, C)) / 127.5 - 1.0
        x0[:, 0, 0, :] = -1.0
        x0[:, 0, 1, :] = 1.0
        self.x0 = x0.astype(np.float32)
        self.noise = self.rng.standard_normal((B, H, W, C)).astype(np.float32)
        self.x_t = ref.q_sample(proc, f64(self.x0), self.t, f64(self.noise)).astype(np.float32)

    def normal(self, scale=1.0, channels=C):
        return (scale * self.rng.standard_normal((B, H, W, channels))).astype(np.float32)


def model_output(batch, proc, mean_type, var_type, near_truth):
    """A float32 network output for the given parameterization.

    near_truth=False: arbitrary values (x0 outputs partly outside [-1, 1] so clipping matters).
    near_truth=True: close to the true eps / x_0 / posterior mean (as a trained model is), so the
    t = 0 decoder (sigma ~ 7e-3) sees means within ~3 sigma of the data. Further out, the float32
    difference of two CDF values near 1 loses its digits (the original code's numerics), which a
    float64 reference cannot reproduce.
    """
    t = batch.t
    if not near_truth:
        mean_part = batch.normal(1.3 if mean_type == 'x0' else 1.0)
    elif mean_type == 'eps':
        mean_part = batch.noise + batch.normal(0.1)
    elif mean_type == 'x0':
        mean_part = batch.x0 + batch.normal(0.003)
    else:
        true_mean = ref.q_posterior(proc, f64(batch.x0), f64(batch.x_t), t)[0]
        sigma = np.sqrt(ref.at(proc.post_var, t)) + 1e-3
        mean_part = (true_mean + 0.3 * sigma * batch.normal()).astype(np.float32)
    if var_type == 'learned':  # a log-variance around the true clipped posterior one
        var_part = (ref.at(proc.post_logvar_clipped, t) + batch.normal(0.5)).astype(np.float32)
    elif var_type == 'learned_range':
        var_part = batch.rng.uniform(-1.0, 1.0, size=(B, H, W, C)).astype(np.float32)
    else:
        return mean_part
    return np.concatenate([mean_part, var_part], axis=-1)


def _p_tolerances(proc, batch, mean_type, output):
    """Elementwise absolute tolerance for pred_x0: 1e-6 times the size of the terms its formula
    combines (clipping can only reduce the error)."""
    t = batch.t
    out = f64(output[..., :C])
    if mean_type == 'eps':
        abar = ref.at(proc.abar, t)
        scale = (np.abs(f64(batch.x_t)) + np.sqrt(1 - abar) * np.abs(out)) / np.sqrt(abar)
    elif mean_type == 'x0':
        scale = np.abs(out)
    else:
        scale = (np.abs(out) + ref.at(proc.post_coef_xt, t) * np.abs(f64(batch.x_t))) / ref.at(
            proc.post_coef_x0, t)
    return 1e-6 * scale


def combo_id(mean_type, var_type, *rest):
    return '-'.join([mean_type, var_type] + [str(r) for r in rest])


# -------------------------------------------------------------------------------------------------
# The forward process q and the conversions
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_q_mean_variance(schedule):
    proc = process(schedule)
    batch = Batch(1, proc)
    d = make(schedule=schedule)
    mean, var, logvar = d.q_mean_variance(batch.x0, batch.t)
    r_mean, r_var, r_logvar = ref.q_mean_variance(proc, f64(batch.x0), batch.t)
    # Achieved: mean 9e-8 rel, log-variance 5e-8 rel.
    assert_close(mean, r_mean, 1e-6, 1e-7, f'q mean {schedule}')
    assert_close(logvar, r_logvar, 1e-6, 1e-7, f'q logvar {schedule}')
    assert_close(var, r_var, 1e-6, 1e-7, f'q variance {schedule}')


def test_q_variance_relative_precision_near_t0():
    """1 - ᾱ_t comes from a float64 table: at t = 0 (1e-4) a float32 subtraction would be 1.7e-4
    relative off."""
    proc = process()
    t = np.array([0, 1, 2, 500, 999], dtype=np.int32)
    x0 = np.zeros((5, 1, 1, 1), np.float32)
    _, var, _ = make().q_mean_variance(x0, t)
    # Achievable: one float32 rounding of a float64 value, 6e-8 relative.
    assert_close(var, 1.0 - ref.at(proc.abar, t), 1e-6, 0, 'q variance relative')


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_q_sample(schedule):
    proc = process(schedule)
    batch = Batch(2, proc)
    x_t = make(schedule=schedule).q_sample(batch.x0, batch.t, batch.noise)
    # Achieved: 1.7e-7 abs.
    assert_close(x_t, ref.q_sample(proc, f64(batch.x0), batch.t, f64(batch.noise)), 1e-6, 1e-6,
                 f'q_sample {schedule}')


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_q_posterior(schedule):
    proc = process(schedule)
    batch = Batch(3, proc)
    mean, var, logvar = make(schedule=schedule).q_posterior(batch.x0, batch.x_t, batch.t)
    r_mean, r_var, r_logvar = ref.q_posterior(proc, f64(batch.x0), f64(batch.x_t), batch.t)
    assert_close(mean, r_mean, 1e-6, 1e-6, f'posterior mean {schedule}')
    assert_close(var, r_var, 1e-6, 0, f'posterior variance {schedule}')
    assert_close(logvar, r_logvar, 1e-6, 0, f'posterior clipped logvar {schedule}')
    # At index 0 (paper t = 1) the posterior mean is x_0 itself and the variance 0.
    assert_close(mean[0], batch.x0[0], 1e-6, 1e-7, 'posterior mean at t=0')
    assert float(np.asarray(var)[0].squeeze()) == 0.0


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_predict_x0_from_eps_and_inverse(schedule):
    proc = process(schedule)
    batch = Batch(4, proc)
    d = make(schedule=schedule)
    eps = batch.normal()
    pred = d.predict_x0_from_eps(batch.x_t, batch.t, eps)
    # Tolerance 1e-6 of the terms combined, (|x_t| + sqrt(1 - abar)|eps|) / sqrt(abar) (up to 2e4
    # at T - 1 for cosine). Achieved: 0.6 of that for cosine, 0.3 for linear.
    assert_close(pred, ref.x0_from_eps(proc, f64(batch.x_t), batch.t, f64(eps)), 1e-5,
                 _p_tolerances(proc, batch, 'eps', eps), f'x0_from_eps {schedule}')
    # With the true noise x_t was built from, x_0 comes back.
    back = d.predict_x0_from_eps(batch.x_t, batch.t, batch.noise)
    # sqrt(1/abar) amplifies the float32 rounding of x_t: up to 1/sqrt(abar_T) ~ 2e4 (cosine).
    # Achieved: 0.3 of this tolerance (3.9e-3 abs at T - 1 for cosine, 3.6e-5 for linear).
    tol = 1e-6 / np.sqrt(ref.at(proc.abar, batch.t))
    assert_close(back, batch.x0, 0, tol, f'x0_from_eps(true noise) {schedule}')
    # The inverse map, against the reference and as a round trip.
    x0_guess = batch.normal(0.7)
    eps_hat = d.predict_eps_from_x0(batch.x_t, batch.t, x0_guess)
    r_eps = ref.eps_from_x0(proc, f64(batch.x_t), batch.t, f64(x0_guess))
    # 1/sqrt(1 - abar) is 100 at t = 0; the error scales with it. Achieved: 0.05 of it.
    tol = 1e-6 / np.sqrt(1.0 - ref.at(proc.abar, batch.t))
    assert_close(eps_hat, r_eps, 1e-5, tol, f'eps_from_x0 {schedule}')
    round_trip = d.predict_x0_from_eps(batch.x_t, batch.t, eps_hat)
    # x_0 = sqrt(1/abar) x_t - (sqrt(1/abar) x_t - x_0) cancels terms of size |x_t| / sqrt(abar).
    # Achieved: 0.16 of this tolerance.
    tol = 1e-6 * (np.abs(batch.x_t) / np.sqrt(ref.at(proc.abar, batch.t)) + np.abs(x0_guess))
    assert_close(round_trip, x0_guess, 0, tol, f'x0 -> eps -> x0 {schedule}')


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_predict_x0_from_xprev(schedule):
    proc = process(schedule)
    batch = Batch(5, proc)
    d = make(schedule=schedule)
    c0 = ref.at(proc.post_coef_x0, batch.t)
    ct = ref.at(proc.post_coef_xt, batch.t)
    # An arbitrary x_{t-1}: dividing by coef1 (~1e-4 at T - 1) amplifies the float32 rounding of
    # the numerator, whose terms are of size |xprev| + coef2 |x_t|.
    xprev = batch.normal()
    pred = d.predict_x0_from_xprev(batch.x_t, batch.t, xprev)
    cond = (np.abs(xprev) + ct * np.abs(batch.x_t)) / c0
    # Achieved: 0.03 of this tolerance (2.4e-3 abs on values ~1e4 at T - 1).
    assert_close(pred, ref.x0_from_xprev(proc, f64(batch.x_t), batch.t, f64(xprev)), 1e-5,
                 1e-6 * cond, f'x0_from_xprev {schedule}')
    # The true posterior mean maps back to x_0.
    true_mean = ref.q_posterior(proc, f64(batch.x0), f64(batch.x_t), batch.t)[0]
    back = d.predict_x0_from_xprev(batch.x_t, batch.t, true_mean.astype(np.float32))
    cond = (np.abs(true_mean) + ct * np.abs(batch.x_t)) / c0  # achieved: 0.07 of the tolerance
    assert_close(back, batch.x0, 0, 1e-6 * cond, f'x0_from_xprev(true mean) {schedule}')


# -------------------------------------------------------------------------------------------------
# The reverse process p
# -------------------------------------------------------------------------------------------------

P_COMBOS = list(itertools.product(MEAN_TYPES, VAR_TYPES, (True, False)))


@pytest.mark.parametrize('mean_type,var_type,clip', P_COMBOS,
                         ids=[combo_id(m, v, 'clip' if c else 'noclip') for m, v, c in P_COMBOS])
def test_p_mean_variance(mean_type, var_type, clip):
    proc = process()
    batch = Batch(10 + P_COMBOS.index((mean_type, var_type, clip)), proc)
    output = model_output(batch, proc, mean_type, var_type, near_truth=False)
    d = make(mean_type, var_type)
    out = d.p_mean_variance(output, batch.x_t, batch.t, clip_denoised=clip)
    r = ref.p_mean_variance(proc, output, f64(batch.x_t), batch.t, mean_type, var_type, clip)
    name = combo_id(mean_type, var_type, clip)
    assert_close(out['pred_x0'], r['pred_x0'], 1e-5, _p_tolerances(proc, batch, mean_type, output),
                 f'p pred_x0 {name}')
    if clip:
        assert np.all(np.abs(np.asarray(out['pred_x0'])) <= 1.0)
    # Achieved: mean 4e-7 abs; log-variance 5e-7 abs; variance 5e-7 rel.
    assert_close(out['mean'], r['mean'], 1e-5, 1e-6, f'p mean {name}')
    assert_close(out['log_variance'], r['log_variance'], 1e-6, 1e-6, f'p logvar {name}')
    assert_close(out['variance'], r['variance'], 1e-5, 0, f'p variance {name}')


def test_p_mean_variance_eps_unclipped_is_eq11():
    """Without clipping, the eps parameterization's mean is eq. 11 (checked at every t)."""
    proc = process()
    rng = np.random.default_rng(7)
    t = np.arange(1000, dtype=np.int32)
    x_t = rng.standard_normal((1000, 2, 2, 1)).astype(np.float32)
    eps = rng.standard_normal((1000, 2, 2, 1)).astype(np.float32)
    out = make('eps', 'fixedsmall').p_mean_variance(eps, x_t, t, clip_denoised=False)
    # Achieved: 2.4e-7 abs.
    assert_close(out['mean'], ref.eps_mean(proc, f64(x_t), t, f64(eps)), 1e-5, 1e-6,
                 'eq. 11 mean')


def test_fixed_variances_at_the_edges():
    """fixedlarge: variance beta_t, log-variance log(beta~_1) at index 0, log(beta_t) after;
    fixedsmall: variance beta~_t (0 at index 0) with the clipped log."""
    proc = process()
    t = np.array([0, 1, 999], dtype=np.int32)
    x = np.zeros((3, 1, 1, 1), np.float32)
    large = make('eps', 'fixedlarge').p_mean_variance(x, x, t)
    small = make('eps', 'fixedsmall').p_mean_variance(x, x, t)
    assert_close(large['variance'], proc.betas[t].reshape(3, 1, 1, 1), 1e-6, 0, 'large var')
    expected = np.log([proc.post_var[1], proc.betas[1], proc.betas[999]]).reshape(3, 1, 1, 1)
    assert_close(large['log_variance'], expected, 1e-6, 0, 'large logvar')
    assert_close(small['variance'], proc.post_var[t].reshape(3, 1, 1, 1), 1e-6, 0, 'small var')
    expected = np.log([proc.post_var[1], proc.post_var[1], proc.post_var[999]]).reshape(3, 1, 1, 1)
    assert_close(small['log_variance'], expected, 1e-6, 0, 'small logvar')


def test_learned_range_endpoints():
    """IDDPM eq. 15: v = 1 gives log beta_t, v = -1 the clipped log beta~_t."""
    proc = process()
    t = np.array([0, 1, 500, 999], dtype=np.int32)
    x = np.zeros((4, 1, 1, 1), np.float32)
    d = make('eps', 'learned_range')
    hi = d.p_mean_variance(np.concatenate([x, x + 1], -1), x, t)['log_variance']
    lo = d.p_mean_variance(np.concatenate([x, x - 1], -1), x, t)['log_variance']
    assert_close(hi, np.log(proc.betas[t]).reshape(4, 1, 1, 1), 1e-6, 0, 'learned_range v=1')
    assert_close(lo, proc.post_logvar_clipped[t].reshape(4, 1, 1, 1), 1e-6, 0,
                 'learned_range v=-1')


def test_p_mean_variance_rejects_wrong_channels():
    x = np.zeros((2, 2, 2, 4), np.float32)
    t = np.array([0, 5], np.int32)
    with pytest.raises(ValueError, match='learned'):  # C channels where 2C are needed
        make('eps', 'learned').p_mean_variance(x, x, t)
    with pytest.raises(ValueError, match='fixedlarge'):  # 2C channels where C are needed
        make('eps', 'fixedlarge').p_mean_variance(np.concatenate([x, x], -1), x, t)
    with pytest.raises(ValueError):  # an odd channel count cannot be split at all
        make('eps', 'learned_range').p_mean_variance(x[..., :3], x, t)


SAMPLE_COMBOS = [('eps', 'fixedlarge'), ('eps', 'fixedsmall'), ('x0', 'learned'),
                 ('xprev', 'learned_range'), ('eps', 'learned_range')]


@pytest.mark.parametrize('mean_type,var_type', SAMPLE_COMBOS,
                         ids=[combo_id(m, v) for m, v in SAMPLE_COMBOS])
def test_p_sample(mean_type, var_type):
    proc = process()
    batch = Batch(30 + SAMPLE_COMBOS.index((mean_type, var_type)), proc)
    output = model_output(batch, proc, mean_type, var_type, near_truth=True)
    z = batch.normal()
    d = make(mean_type, var_type)
    x_prev, pred_x0 = d.p_sample(output, batch.x_t, batch.t, z, clip_denoised=True)
    r_prev, r_pred = ref.p_sample(proc, output, f64(batch.x_t), batch.t, f64(z), mean_type,
                                  var_type, True)
    name = combo_id(mean_type, var_type)
    # Achieved: 3e-7 abs.
    assert_close(x_prev, r_prev, 1e-5, 1e-6, f'p_sample {name}')
    assert_close(pred_x0, r_pred, 1e-5, _p_tolerances(proc, batch, mean_type, output),
                 f'p_sample pred_x0 {name}')
    out = d.p_mean_variance(output, batch.x_t, batch.t, clip_denoised=True)
    mean = np.asarray(out['mean'])
    x_prev = np.asarray(x_prev)
    # No noise at t = 0: exactly the mean.
    zero = batch.t == 0
    assert zero.sum() == 1
    np.testing.assert_array_equal(x_prev[zero], mean[zero])
    # Elsewhere the noise is scaled by exp(0.5 log sigma^2) (not by the 'variance' entry).
    # Achieved: 5e-7 abs (the float32 rounding of x_prev).
    sigma = np.sqrt(np.exp(ref.p_mean_variance(proc, output, f64(batch.x_t), batch.t, mean_type,
                                               var_type, True)['log_variance']))
    assert_close((f64(x_prev) - f64(mean))[~zero], (sigma * f64(z))[~zero], 1e-5, 1e-6,
                 f'p_sample noise {name}')


# -------------------------------------------------------------------------------------------------
# KL, the decoder, the bound
# -------------------------------------------------------------------------------------------------


def test_normal_kl():
    rng = np.random.default_rng(40)
    shape = (64, 8)
    m1, m2 = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    lv1, lv2 = (rng.uniform(-10, 2, shape).astype(np.float32) for _ in range(2))
    kl = dj.normal_kl(m1, lv1, m2, lv2)
    # Achieved: 2e-6 rel (values range over 1e-3 .. 1e6).
    assert_close(kl, ref.gaussian_kl(f64(m1), f64(lv1), f64(m2), f64(lv2)), 1e-5, 1e-6,
                 'normal_kl')
    assert_close(dj.normal_kl(m1, lv1, m1, lv1), np.zeros(shape), 0, 1e-6, 'normal_kl(p, p)')
    # Broadcasting against a standard normal, as the prior term uses it.
    assert_close(dj.normal_kl(m1, lv1, 0.0, 0.0), ref.gaussian_kl(f64(m1), f64(lv1), 0.0, 0.0),
                 1e-5, 1e-6, 'normal_kl vs N(0, 1)')


def test_approx_standard_normal_cdf():
    z = np.linspace(-6.0, 6.0, 481).astype(np.float32)
    got = dj.approx_standard_normal_cdf(z)
    # 1 + tanh loses the lower tail to float32 rounding near tanh = -1 (a few 6e-8 absolute).
    # Achieved: 1.1e-7 abs (a value of 1.07e-7 rounded to 0).
    assert_close(got, ref.approx_cdf(f64(z)), 1e-6, 2e-7, 'tanh CDF')
    # It approximates the normal CDF to 1.8e-4 (sanity check of the reference's formula).
    exact = 0.5 * np.array([math.erfc(-v / math.sqrt(2.0)) for v in f64(z)])
    assert np.max(np.abs(ref.approx_cdf(f64(z)) - exact)) < 2e-4


def _grid_points():
    """All 256 grid values, including exactly -1 and 1, as float32."""
    return (np.arange(256) / 127.5 - 1.0).astype(np.float32)


def test_discretized_gaussian_log_likelihood():
    rng = np.random.default_rng(41)
    x = np.tile(_grid_points(), 8)
    # Scales as at t = 0 (sigma ~ 0.01) and larger; means within a few sigma of the data.
    log_scales = rng.uniform(math.log(3e-3), math.log(0.3), x.shape).astype(np.float32)
    means = (x + np.exp(log_scales) * rng.uniform(-2.0, 2.0, x.shape)).astype(np.float32)
    got = dj.discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
    expected = ref.discretized_log_likelihood(f64(x), f64(means), f64(log_scales))
    # A float32 difference of two CDF values has an absolute error of a few 6e-8, so log P(bin)
    # is good to ~6e-8 / P(bin) (P down to 1e-3 here): tolerance 1e-6 + 5e-7 / P.
    # Achieved: 4.5e-5 abs at the smallest P, 0.24 of the tolerance.
    tol = 1e-6 + 5e-7 / np.exp(expected)
    assert_close(got, expected, 1e-6, tol, 'discretized log-likelihood')
    for value in (-1.0, 1.0):  # the edge bins extend to -inf / +inf
        sel = x == value
        assert_close(np.asarray(got)[sel], expected[sel], 1e-6, tol[sel], f'edge bin {value}')
    # Far from the data every branch hits the 1e-12 floor.
    far = dj.discretized_gaussian_log_likelihood(
        np.array([-1.0, 0.0, 1.0], np.float32), means=np.array([0.9, 0.9, -0.9], np.float32),
        log_scales=np.full(3, math.log(1e-3), np.float32))
    assert_close(far, np.full(3, math.log(1e-12)), 1e-6, 0, 'log floor')


def test_discretized_likelihood_is_normalized():
    """The bins telescope: the probabilities of the 256 values sum to exactly 1."""
    x = _grid_points()
    for mean, log_scale in [(0.0, math.log(0.2)), (0.97, math.log(0.05)), (-0.5, math.log(0.5))]:
        logp = dj.discretized_gaussian_log_likelihood(
            x, means=np.full(256, mean, np.float32),
            log_scales=np.full(256, log_scale, np.float32))
        assert float(np.sum(np.exp(f64(logp)))) == pytest.approx(1.0, abs=1e-5)
        ref_p = np.exp(ref.discretized_log_likelihood(f64(x), mean, log_scale))
        # Not 1e-15: the float32 grid points make neighbouring bin edges differ by ~3e-8.
        assert float(np.sum(ref_p)) == pytest.approx(1.0, abs=1e-6)


VB_COMBOS = [('eps', 'fixedlarge', True), ('eps', 'fixedsmall', False), ('x0', 'fixedsmall', True),
             ('xprev', 'fixedlarge', False), ('xprev', 'fixedsmall', True),
             ('eps', 'learned', True), ('eps', 'learned_range', False),
             ('x0', 'learned_range', True), ('xprev', 'learned', False)]


@pytest.mark.parametrize('mean_type,var_type,clip', VB_COMBOS,
                         ids=[combo_id(m, v, 'clip' if c else 'noclip') for m, v, c in VB_COMBOS])
def test_vb_terms_bpd(mean_type, var_type, clip):
    proc = process()
    batch = Batch(50 + VB_COMBOS.index((mean_type, var_type, clip)), proc)
    output = model_output(batch, proc, mean_type, var_type, near_truth=True)
    d = make(mean_type, var_type)
    bits, pred_x0 = d.vb_terms_bpd(output, batch.x0, batch.x_t, batch.t, clip_denoised=clip)
    r_bits, r_pred = ref.vb_terms_bpd(proc, output, f64(batch.x0), f64(batch.x_t), batch.t,
                                      mean_type, var_type, clip)
    name = combo_id(mean_type, var_type, clip)
    assert bits.shape == (B,)
    # Achieved: 9e-7 abs (0.17 of the tolerance); bits range from ~0 (t = T - 1) to ~40.
    assert_close(bits, r_bits, 1e-5, 1e-6, f'vb bits {name}')
    assert_close(pred_x0, r_pred, 1e-5,
                 _p_tolerances(proc, batch, mean_type, output), f'vb pred_x0 {name}')
    # The t = 0 entry is the decoder NLL, not a KL: the two differ by far more than the tolerance.
    q_mean, _, q_logvar = ref.q_posterior(proc, f64(batch.x0), f64(batch.x_t), batch.t)
    p = ref.p_mean_variance(proc, output, f64(batch.x_t), batch.t, mean_type, var_type, clip)
    kl0 = np.mean(ref.gaussian_kl(q_mean[0], q_logvar[0], p['mean'][0], p['log_variance'][0]))
    assert abs(kl0 / math.log(2) - float(bits[0])) > 1e-2


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_prior_bpd(schedule):
    proc = process(schedule)
    batch = Batch(60, proc)
    prior = make(schedule=schedule).prior_bpd(batch.x0)
    r_prior = ref.prior_bpd(proc, f64(batch.x0))
    # The KL of two nearly equal Gaussians cancels: about 1e-5 bits (linear) or 1e-9 (cosine),
    # computed from terms of size 1 in float32, so only an absolute tolerance is meaningful.
    # Achieved: 6e-10 abs (linear), 2e-16 (cosine).
    assert_close(prior, r_prior, 0, 5e-7, f'prior bpd {schedule}')
    assert np.all(r_prior < 1e-4)


# -------------------------------------------------------------------------------------------------
# Training losses
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('var_type', ['fixedlarge', 'fixedsmall'])
@pytest.mark.parametrize('mean_type', MEAN_TYPES)
def test_training_losses_mse(mean_type, var_type):
    proc = process()
    batch = Batch(70 + MEAN_TYPES.index(mean_type), proc)
    output = model_output(batch, proc, mean_type, var_type, near_truth=False)
    loss = make(mean_type, var_type, 'mse').training_losses(
        output, batch.x0, batch.x_t, batch.t, batch.noise)
    r_loss = ref.training_losses(proc, f64(output), f64(batch.x0), f64(batch.x_t), batch.t,
                                 f64(batch.noise), mean_type, var_type, 'mse')
    assert loss.shape == (B,) and loss.dtype == jnp.float32
    # Achieved: 1.6e-7 rel.
    assert_close(loss, r_loss, 1e-5, 1e-7, f'mse {mean_type}')
    if mean_type == 'eps':  # L_simple is a mean over pixels (eq. 14)
        expected = np.mean((f64(batch.noise) - f64(output)) ** 2, axis=(1, 2, 3))
        assert_close(loss, expected, 1e-5, 1e-7, 'L_simple')


LOSS_COMBOS = [('eps', 'fixedlarge', 'kl'), ('x0', 'fixedsmall', 'kl'), ('xprev', 'learned', 'kl'),
               ('eps', 'learned_range', 'kl'), ('eps', 'learned_range', 'hybrid'),
               ('x0', 'learned_range', 'hybrid'), ('eps', 'learned', 'hybrid'),
               ('eps', 'fixedlarge', 'hybrid')]


@pytest.mark.parametrize('mean_type,var_type,loss_type', LOSS_COMBOS,
                         ids=[combo_id(m, v, lt) for m, v, lt in LOSS_COMBOS])
def test_training_losses_bound(mean_type, var_type, loss_type):
    proc = process()
    batch = Batch(80 + LOSS_COMBOS.index((mean_type, var_type, loss_type)), proc)
    output = model_output(batch, proc, mean_type, var_type, near_truth=True)
    loss = make(mean_type, var_type, loss_type).training_losses(
        output, batch.x0, batch.x_t, batch.t, batch.noise)
    r_loss = ref.training_losses(proc, f64(output), f64(batch.x0), f64(batch.x_t), batch.t,
                                 f64(batch.noise), mean_type, var_type, loss_type)
    assert loss.shape == (B,)
    # Achieved: 1.2e-6 abs (0.09 of the tolerance).
    assert_close(loss, r_loss, 1e-5, 1e-6, f'{loss_type} {mean_type} {var_type}')


def _elementwise_loss_fd(proc, output, batch, mean_type, var_type, scale, channel_slice,
                         h=1e-6):
    """Central differences of scale * (bound term in nats per element) w.r.t. the output channels
    `channel_slice`. The bound's pixel terms are independent, so every element is perturbed at
    once."""
    def terms(out):
        return ref.vb_terms_elementwise(proc, out, f64(batch.x0), f64(batch.x_t), batch.t,
                                        mean_type, var_type, False)[0]
    plus, minus = f64(output).copy(), f64(output).copy()
    plus[..., channel_slice] += h
    minus[..., channel_slice] -= h
    return scale * (terms(plus) - terms(minus)) / (2 * h)


def _loss_grad(d, output, batch):
    """d(sum of training_losses) / d(model output), by jax.grad."""
    def total(o):
        return jnp.sum(d.training_losses(o, batch.x0, batch.x_t, batch.t, batch.noise))
    return np.asarray(jax.jit(jax.grad(total))(jnp.asarray(output)), dtype=F64)


@pytest.mark.parametrize('var_type', LEARNED)
def test_hybrid_gradients(var_type):
    """Hybrid loss: the bound term trains only the variance half (stop-gradient on the mean)."""
    proc = process()
    batch = Batch(90 + LEARNED.index(var_type), proc)
    output = model_output(batch, proc, 'eps', var_type, near_truth=True)
    d = make('eps', var_type, 'hybrid')
    grad = _loss_grad(d, output, batch)
    n_pix = H * W * C
    # Mean half: only L_simple's gradient, -2 (eps - eps_theta) / n_pix. Achieved: 6e-10 abs.
    mse_grad = -2.0 * (f64(batch.noise) - f64(output[..., :C])) / n_pix
    assert_close(grad[..., :C], mse_grad, 1e-5, 1e-8, f'hybrid mean-half grad {var_type}')
    # Without the stop-gradient the bound would add a gradient of this size (max 0.02 .. 0.03,
    # far above the 1e-8 tolerance) to the mean half.
    vb_scale = d.hybrid_lambda * proc.T / (n_pix * ref.LN2)
    vb_mean_grad = _elementwise_loss_fd(proc, output, batch, 'eps', var_type, vb_scale,
                                        slice(0, C))
    assert np.max(np.abs(vb_mean_grad)) > 1e-3
    # Variance half: lambda * T * d(L_t bits)/dv, against finite differences of the reference.
    # float32 cancellation in d KL / d log-variance (1 - exp(lv1 - lv2) - ...) limits the
    # agreement to ~1e-5 of the largest gradient. Achieved: 1.5e-6 (learned) and 5.5e-6
    # (learned_range) relative to the max.
    vb_var_grad = _elementwise_loss_fd(proc, output, batch, 'eps', var_type, vb_scale,
                                       slice(C, 2 * C))
    assert np.max(np.abs(vb_var_grad)) > 1e-3
    assert_close(grad[..., C:], vb_var_grad, 1e-4, 1e-4 * np.max(np.abs(vb_var_grad)),
                 f'hybrid variance-half grad {var_type}')


def test_kl_loss_gradient_reaches_both_halves():
    """With loss_type 'kl' the bound trains the mean too (compare: hybrid above)."""
    proc = process()
    batch = Batch(95, proc)
    output = model_output(batch, proc, 'eps', 'learned_range', near_truth=True)
    d = make('eps', 'learned_range', 'kl')
    grad = _loss_grad(d, output, batch)
    scale = 1.0 / (H * W * C * ref.LN2)
    for half, sl in (('mean', slice(0, C)), ('variance', slice(C, 2 * C))):
        fd = _elementwise_loss_fd(proc, output, batch, 'eps', 'learned_range', scale, sl)
        assert np.max(np.abs(fd)) > 1e-3
        # Achieved: 2.7e-5 (mean half) and 8e-6 (variance half) relative to the max.
        assert_close(grad[..., sl], fd, 1e-4, 1e-4 * np.max(np.abs(fd)), f'kl grad {half}')


# -------------------------------------------------------------------------------------------------
# The whole bound
# -------------------------------------------------------------------------------------------------

# Deterministic toy denoisers whose x_0 guesses at t = 0 stay within a few decoder sigmas of the
# data.
BPD_CONFIGS = [('eps', 'fixedlarge', True, 0.3), ('x0', 'fixedsmall', False, 1.0)]


def _bpd_inputs():
    rng = np.random.default_rng(100)
    x0 = (rng.integers(0, 256, size=(3, 4, 4, 2)) / 127.5 - 1.0).astype(np.float32)
    x0[:, 0, 0, 0], x0[:, 0, 1, 0] = -1.0, 1.0
    return x0, jax.random.PRNGKey(3)


@functools.lru_cache(maxsize=None)
def _bpd_run(mean_type, var_type, clip, gain, timestep_batch=1):
    """calc_bpd_loop on the 20-step linear schedule, as NumPy (cached: each run compiles)."""
    d = Diffusion.create(get_beta_schedule('linear', 20), mean_type=mean_type, var_type=var_type,
                         loss_type='kl')
    x0, key = _bpd_inputs()
    out = dj.calc_bpd_loop(lambda x, t: gain * x, d, x0, key, clip_denoised=clip,
                           timestep_batch=timestep_batch)
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize('mean_type,var_type,clip,gain', BPD_CONFIGS,
                         ids=[combo_id(m, v, 'clip' if c else 'noclip', f'{g}x')
                              for m, v, c, g in BPD_CONFIGS])
def test_calc_bpd_loop(mean_type, var_type, clip, gain):
    """The whole bound on a 20-step linear schedule against the reference's sum of every term."""
    T = 20
    proc = ref.Process(ref.beta_schedule('linear', T))
    x0, key = _bpd_inputs()
    out = _bpd_run(mean_type, var_type, clip, gain)
    # The documented noise contract: the noise of step t is normal(fold_in(rng, t)).
    noises = [f64(jax.random.normal(jax.random.fold_in(key, i), x0.shape, jnp.float32))
              for i in range(T)]
    r = ref.total_bpd(proc, f64(x0), noises, lambda x, t: gain * x, clip, mean_type, var_type)
    assert out['terms_bpd'].shape == (3, T) and out['x0_mse'].shape == (3, T)
    assert out['total_bpd'].shape == (3,) and out['prior_bpd'].shape == (3,)
    # Achieved: terms 4.4e-6 abs (0.13 of the tolerance), total 4e-7 rel, mse 4e-8 abs.
    assert_close(out['terms_bpd'], r['terms_bpd'], 1e-5, 1e-6, 'bpd terms')
    assert_close(out['prior_bpd'], r['prior_bpd'], 1e-5, 1e-6, 'bpd prior')
    assert_close(out['total_bpd'], r['total_bpd'], 1e-5, 1e-6, 'bpd total')
    assert_close(out['x0_mse'], r['x0_mse'], 1e-5, 1e-7, 'bpd x0 mse')
    # The total is every term plus the prior.
    assert_close(out['total_bpd'], np.sum(f64(out['terms_bpd']), axis=1) + f64(out['prior_bpd']),
                 1e-6, 0, 'bpd total = sum of terms + prior')


def test_calc_bpd_loop_timestep_batch():
    """Chunking the timesteps changes nothing, also with a chunk size that does not divide T."""
    base = _bpd_run(*BPD_CONFIGS[0])
    for timestep_batch in (7, 20):  # 7: two chunks of 7 plus a remainder of 6
        other = _bpd_run(*BPD_CONFIGS[0], timestep_batch=timestep_batch)
        for k in ('total_bpd', 'terms_bpd', 'x0_mse', 'prior_bpd'):
            # Achieved: identical for 20; 1 float32 ulp (2e-8 rel) for 7.
            np.testing.assert_allclose(f64(other[k]), f64(base[k]), rtol=1e-6, atol=0,
                                       err_msg=f'timestep_batch={timestep_batch} {k}')


# -------------------------------------------------------------------------------------------------
# Error messages
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('kind,valid', [('mean_type', MEAN_TYPES), ('var_type', VAR_TYPES),
                                        ('loss_type', ('mse', 'kl', 'hybrid'))],
                         ids=['mean_type', 'var_type', 'loss_type'])
def test_unknown_names_list_valid_ones(kind, valid):
    kwargs = dict(mean_type='eps', var_type='fixedlarge', loss_type='kl')
    kwargs[kind] = 'bogus'
    with pytest.raises(ValueError) as info:
        Diffusion.create(betas(), **kwargs)
    message = str(info.value)
    assert 'bogus' in message and kind in message
    for name in valid:
        assert name in message


@pytest.mark.parametrize('var_type', LEARNED)
def test_mse_with_learned_variance_raises(var_type):
    with pytest.raises(ValueError, match='mse'):
        Diffusion.create(betas(), mean_type='eps', var_type=var_type, loss_type='mse')


@pytest.mark.parametrize('bad', [[0.1, 0.0, 0.2], [0.1, 1.5], [[0.1, 0.2]]],
                         ids=['zero', 'above-one', 'two-d'])
def test_invalid_betas_raise(bad):
    with pytest.raises(ValueError, match='betas'):
        Diffusion.create(np.array(bad))

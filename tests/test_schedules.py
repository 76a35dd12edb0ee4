"""Beta schedules and the float32 tables built from them, against the float64 reference."""

import math

import numpy as np
import pytest

from diffusion_jax.diffusion import Diffusion
from diffusion_jax.schedules import BETA_SCHEDULES, get_beta_schedule

try:  # `tests` is not a package: import the reference by either route pytest may set up.
    from tests import reference_ddpm as ref
except ImportError:  # pragma: no cover
    import reference_ddpm as ref

ALL_SCHEDULES = ('linear', 'cosine', 'quad', 'const', 'jsd', 'warmup10', 'warmup50')


def test_schedule_names_are_the_expected_ones():
    assert set(BETA_SCHEDULES) == set(ALL_SCHEDULES)


@pytest.mark.parametrize('num_timesteps', [1000, 37], ids=lambda n: f'T{n}')
@pytest.mark.parametrize('name', ALL_SCHEDULES)
def test_schedule_matches_reference(name, num_timesteps):
    betas = get_beta_schedule(name, num_timesteps)
    expected = ref.beta_schedule(name, num_timesteps)
    assert betas.dtype == np.float64
    assert betas.shape == (num_timesteps,)
    assert np.all(betas > 0) and np.all(betas <= 1)
    # Both float64. Achieved max relative error 6e-16 except for cosine, where beta = 1 - ratio
    # cancels: the two ratios differ in the last bit (2e-16 absolute), 2e-12 relative at beta ~4e-5.
    np.testing.assert_allclose(betas, expected, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize('name', ['linear', 'quad', 'const', 'warmup10', 'warmup50'])
def test_schedule_endpoints_are_used(name):
    betas = get_beta_schedule(name, 200, beta_start=3e-4, beta_end=0.05)
    np.testing.assert_allclose(betas, ref.beta_schedule(name, 200, 3e-4, 0.05),
                               rtol=1e-13, atol=0)
    assert betas[-1] == pytest.approx(0.05, rel=1e-14)
    if name != 'const':
        assert betas[0] == pytest.approx(3e-4, rel=1e-14)


def test_paper_linear_schedule():
    """Ho et al. §4: T = 1000, beta from 1e-4 to 0.02, evenly spaced."""
    betas = get_beta_schedule('linear', 1000)
    assert betas[0] == 1e-4 and betas[-1] == pytest.approx(0.02, rel=1e-15)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)


def test_cosine_alpha_bar_is_eq17_closed_form():
    """IDDPM eq. 17: prod(1 - beta) telescopes to f(t) / f(0) except where beta is capped."""
    T = 1000
    betas = get_beta_schedule('cosine', T)
    abar = np.cumprod(1.0 - betas)
    closed = np.array([ref.cosine_alpha_bar(i + 1, T) for i in range(T)])
    # All but the last step are uncapped; achieved max relative error ~1e-13.
    np.testing.assert_allclose(abar[:-1], closed[:-1], rtol=1e-10)
    # f(T) = 0 makes the last beta 1; it is capped at 0.999.
    assert betas[-1] == 0.999
    assert np.all(betas[:-1] < 0.999)


def test_jsd_schedule_values():
    np.testing.assert_allclose(get_beta_schedule('jsd', 4), [1 / 4, 1 / 3, 1 / 2, 1.0], rtol=1e-15)


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError) as info:
        get_beta_schedule('sigmoid', 10)
    message = str(info.value)
    assert 'sigmoid' in message
    for name in ALL_SCHEDULES:
        assert name in message


TABLE_NAMES = ('betas', 'alphas_cumprod', 'alphas_cumprod_prev', 'sqrt_alphas_cumprod',
               'sqrt_one_minus_alphas_cumprod', 'log_one_minus_alphas_cumprod',
               'sqrt_recip_alphas_cumprod', 'sqrt_recipm1_alphas_cumprod', 'posterior_variance',
               'posterior_log_variance_clipped', 'posterior_mean_coef1', 'posterior_mean_coef2')


@pytest.mark.parametrize('table', TABLE_NAMES)
@pytest.mark.parametrize('name', ['linear', 'cosine', 'quad', 'warmup10'])
def test_float32_tables_are_rounded_float64(name, table):
    """Each stored float32 table is the float64 reference value rounded once to float32.

    One rounding is at most 2^-24 relative (6e-8), so rtol = 2^-23 (one ulp) leaves room only for
    the last-bit disagreement of two float64 computations; a table computed in float32 (e.g. the
    cumulative product) misses this by orders of magnitude (1 - alphas_cumprod ~ 1e-4 at t = 0).
    Achieved max relative error: 6.0e-8 for every table.
    """
    T = 1000
    diffusion = Diffusion.create(get_beta_schedule(name, T))
    stored = np.asarray(getattr(diffusion, table))
    assert stored.dtype == np.float32 and stored.shape == (T,)
    expected = ref.Process(ref.beta_schedule(name, T)).tables()[table]
    np.testing.assert_allclose(stored.astype(np.float64), expected, rtol=2.0 ** -23, atol=0)


def test_posterior_tables_at_the_edges():
    """beta~ at index 0 is exactly 0, the clipped log uses index 1, coef1 = 1 and coef2 = 0."""
    d = Diffusion.create(get_beta_schedule('linear', 1000))
    proc = ref.Process(ref.beta_schedule('linear', 1000))
    assert float(d.posterior_variance[0]) == 0.0
    assert float(d.posterior_log_variance_clipped[0]) == float(d.posterior_log_variance_clipped[1])
    assert float(d.posterior_log_variance_clipped[1]) == pytest.approx(
        math.log(proc.post_var[1]), rel=1e-7)
    assert float(d.posterior_mean_coef1[0]) == pytest.approx(1.0, rel=1e-7)
    assert float(d.posterior_mean_coef2[0]) == 0.0
    assert float(d.alphas_cumprod_prev[0]) == 1.0

"""Ground truth on 2-D data: samplers driven by the exact score of a Gaussian mixture must
reproduce it, and the ODE likelihood of the exact score must equal the closed-form density.

Distances are judged against data vs data at the same n = 2000, where (measured over 20 seeds)
MMD² has mean -1e-4 and standard deviation 9e-4, and the sliced W2 mean 0.09, standard deviation
0.03. The bounds are MMD² within 0.004 and sliced W2 within 0.1 of the data-vs-data values; the
MMD bound fails for a mixture whose weights are off by 0.1 (the negative control below).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import sde as sde_lib
from diffusion_jax import toy
from diffusion_jax.evaluation import ode_likelihood, two_sample
from diffusion_jax.sampling import langevin, ode, pc

MIXTURE = toy.GaussianMixture()
N_POINTS = 2000
MMD_MARGIN, SW_MARGIN = 0.004, 0.1


def numpy_log_prob(x, m, s):
    """float64 log Σ_k w_k N(x; m μ_k, (m² τ_k² + s²) I), written out per component."""
    terms = []
    for mu, tau, w in zip(MIXTURE.means, MIXTURE.stds, MIXTURE.weights):
        var = (m * tau) ** 2 + s ** 2
        sq = np.sum((x - m[:, None] * np.asarray(mu)) ** 2, axis=1)
        terms.append(math.log(w) - sq / (2 * var) - np.log(2 * math.pi * var))
    return np.logaddexp.reduce(terms, axis=0)


def test_mixture_density_and_score_match_numpy():
    rs = np.random.RandomState(0)
    x = rs.normal(size=(64, 2)) * 1.5
    m, s = rs.uniform(0.05, 1.0, 64), rs.uniform(0.0, 2.0, 64)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    np.testing.assert_allclose(MIXTURE.log_prob(f32(x), f32(m), f32(s)), numpy_log_prob(x, m, s),
                               rtol=1e-5, atol=1e-5)
    h = 1e-5  # central differences of the float64 density
    fd = np.stack([(numpy_log_prob(x + h * e, m, s) - numpy_log_prob(x - h * e, m, s)) / (2 * h)
                   for e in np.eye(2)], axis=1)
    np.testing.assert_allclose(MIXTURE.score(f32(x), f32(m), f32(s)), fd, rtol=1e-4, atol=1e-4)


def test_two_sample_statistics():
    rs = np.random.RandomState(1)
    x, y = rs.normal(size=(30, 2)), rs.normal(size=(25, 2)) + 0.3

    def k(a, b):
        return sum(math.exp(-np.sum((a - b) ** 2) / (2 * h * h)) for h in (0.1, 0.3, 1.0, 3.0))

    xx = sum(k(a, b) for i, a in enumerate(x) for j, b in enumerate(x) if i != j) / (30 * 29)
    yy = sum(k(a, b) for i, a in enumerate(y) for j, b in enumerate(y) if i != j) / (25 * 24)
    xy = sum(k(a, b) for a in x for b in y) / (30 * 25)
    assert two_sample.mmd_squared(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    # A shift c moves every projection onto θ by c·θ, and E_θ (c·θ)² = ‖c‖² / 2 in 2-D.
    z = rs.normal(size=(500, 2))
    shift = np.array([0.6, -0.8])
    got = two_sample.sliced_wasserstein(z + shift, z, num_projections=4096)
    assert got == pytest.approx(1.0 / math.sqrt(2.0), rel=0.03)
    with pytest.raises(ValueError, match='equal sample sizes'):
        two_sample.sliced_wasserstein(x, y)


def _check(samples, seed=5):
    got = toy.distribution_checks(np.asarray(samples, np.float64), MIXTURE, jax.random.key(seed))
    assert np.all(np.isfinite(samples))
    return got


def _assert_recovers(metrics):
    assert metrics['mmd2'] < metrics['mmd2_data'] + MMD_MARGIN, metrics
    assert metrics['sliced_w2'] < metrics['sliced_w2_data'] + SW_MARGIN, metrics


SDE_CASES = [('vp', 'reverse_diffusion', 'langevin'), ('vp', 'euler_maruyama', 'none'),
             ('vp', 'ancestral', 'none'), ('subvp', 'reverse_diffusion', 'langevin'),
             ('ve', 'reverse_diffusion', 'langevin'), ('ve', 'ancestral', 'none')]


@pytest.mark.parametrize('name,predictor,corrector', SDE_CASES,
                         ids=['-'.join(c) for c in SDE_CASES])
def test_pc_samplers_with_the_exact_score_recover_the_mixture(name, predictor, corrector):
    sde = sde_lib.get_sde(name, num_scales=500)
    x, _ = pc.pc_sample(toy.exact_eps_model(MIXTURE, sde), None, sde, jax.random.key(0),
                        (N_POINTS, 2), predictor=predictor, corrector=corrector, snr=0.16)
    _assert_recovers(_check(x))


@pytest.mark.parametrize('name', sde_lib.SDE_NAMES)
def test_probability_flow_with_the_exact_score_recovers_the_mixture(name):
    sde = sde_lib.get_sde(name, num_scales=500)
    x, steps = ode.ode_sample(toy.exact_eps_model(MIXTURE, sde), None, sde, jax.random.key(0),
                              (N_POINTS, 2))
    assert 5 < int(steps) < 200  # adaptive: far fewer evaluations than N
    _assert_recovers(_check(x))


def test_annealed_langevin_with_the_exact_score_recovers_the_mixture():
    ncsn = sde_lib.NCSN(num_scales=10, sigma_min=0.01, sigma_max=3.0)
    x, _ = langevin.annealed_langevin_sample(toy.exact_eps_model(MIXTURE, ncsn), None, ncsn,
                                             jax.random.key(0), (N_POINTS, 2), n_steps_each=100,
                                             step_lr=2e-5)
    _assert_recovers(_check(x))


def test_negative_control_a_wrong_score_fails_the_same_bounds():
    wrong = toy.GaussianMixture(weights=(0.4, 0.4, 0.2))
    sde = sde_lib.get_sde('vp', num_scales=500)
    x, _ = ode.ode_sample(toy.exact_eps_model(wrong, sde), None, sde, jax.random.key(0),
                          (N_POINTS, 2))
    metrics = _check(x)
    assert metrics['mmd2'] > metrics['mmd2_data'] + MMD_MARGIN, metrics


@pytest.mark.parametrize('name', sde_lib.SDE_NAMES)
def test_ode_likelihood_of_the_exact_score_matches_the_closed_form(name):
    """Exact divergence: every point within 0.05 nats of log p_ε. Hutchinson (one probe per
    point; checked on VP): unbiased, so the mean error over 500 points is within 4 standard
    errors of 0."""
    sde = sde_lib.get_sde(name, num_scales=500)
    model = toy.exact_eps_model(MIXTURE, sde)
    x = MIXTURE.sample(jax.random.key(3), 500)
    m, s = sde.marginal_prob(jnp.ones((len(x), 1)), jnp.full((len(x),), sde.sample_eps))
    truth = numpy_log_prob(np.asarray(x, np.float64), np.asarray(m[:, 0], np.float64),
                           np.asarray(s, np.float64))
    logp, _, _ = ode_likelihood.log_likelihood(model, None, sde, x, jax.random.key(4),
                                               method='exact')
    assert np.max(np.abs(np.asarray(logp) - truth)) < 0.05
    for probe in ode_likelihood.PROBES if name == 'vp' else ():  # the same estimator for all
        logp, _, _ = ode_likelihood.log_likelihood(model, None, sde, x, jax.random.key(4),
                                                   probe=probe)
        err = np.asarray(logp, np.float64) - truth
        assert abs(err.mean()) < 4 * err.std() / math.sqrt(len(err)) + 0.01, (probe, err.mean())


def test_ode_encode_decode_round_trip_and_latent_is_the_prior():
    sde = sde_lib.get_sde('vp', num_scales=500)
    model = toy.exact_eps_model(MIXTURE, sde)
    x = MIXTURE.sample(jax.random.key(5), N_POINTS)
    errors = {}
    for tol in (1e-5, 1e-6):
        latent, _ = ode.ode_encode(model, None, sde, x, rtol=tol, atol=tol)
        back, _ = ode.ode_sample_from(model, None, sde, latent, rtol=tol, atol=tol, denoise=False)
        errors[tol] = np.max(np.abs(np.asarray(back - x)), axis=1)
    # Measured: median 3e-6, max 3e-3 (points between the modes) at 1e-5; max 2e-4 at 1e-6.
    assert np.median(errors[1e-5]) < 1e-4 and errors[1e-5].max() < 1e-2
    assert errors[1e-6].max() < 1e-3
    # The flow carries p_ε to p_1 ≈ N(0, I).
    np.testing.assert_allclose(np.mean(latent, 0), 0.0, atol=0.08)
    np.testing.assert_allclose(np.cov(np.asarray(latent).T), np.eye(2), atol=0.1)


def test_bits_per_dim_dequantization_offset():
    """bits/dim of uint8 data = -log p(x) / (D ln 2) + 7 for x = 2 (k + u) / 256 - 1; under a
    zero score the VE flow stands still, so log p(x) is the N(0, σ_max² I) prior's."""
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0)
    images = np.random.RandomState(6).randint(0, 256, size=(8, 2, 2, 1), dtype=np.uint8)
    out = ode_likelihood.bits_per_dim(lambda p, x, t: jnp.zeros_like(x), None, sde, images,
                                      jax.random.key(7), batch_size=4, progress=False)
    x = np.asarray(ode_likelihood.dequantize(images[:4], jax.random.split(
        jax.random.fold_in(jax.random.key(7), 0))[0]), np.float64)
    logp = -0.5 * 4 * math.log(2 * math.pi * 2500.0) - 0.5 * np.sum(x ** 2, (1, 2, 3)) / 2500.0
    np.testing.assert_allclose(out['bpd'][:4], -logp / (4 * math.log(2)) + 7.0, rtol=1e-5)

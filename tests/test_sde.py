"""Score SDEs and NCSN against the float64 reference (tests/reference_sde.py): marginals against
numerically integrated moment ODEs, every predictor and corrector step, the losses, the VP =
DDPM identity and annealed Langevin dynamics with the noise contract."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_ddpm
import reference_sde as ref
from diffusion_jax import sde as sde_lib
from diffusion_jax import train
from diffusion_jax.sampling import langevin, pc

pytestmark = pytest.mark.usefixtures('fast_compiles')

NAMES = ('vp', 'subvp', 've')
SHAPE = (4, 5, 5, 2)


def make(name, N=1000):
    return sde_lib.get_sde(name, num_scales=N), ref.SDE(name, N=N)


def random_inputs(seed, shape=SHAPE, t_low=1e-3):
    rs = np.random.RandomState(seed)
    x = rs.normal(size=shape)
    t = rs.uniform(t_low, 1.0, size=shape[0])
    return x, t, rs.normal(size=shape), rs.normal(size=shape)


@pytest.mark.parametrize('name', NAMES)
def test_marginals_solve_the_moment_odes(name):
    sde, r = make(name)
    t = np.array([1e-5, 0.013, 0.2, 0.5, 0.77, 1.0])
    mean, std = sde.marginal_prob(jnp.ones((len(t), 1)), jnp.asarray(t, jnp.float32))
    want = np.array([r.moments(ti) for ti in t])
    np.testing.assert_allclose(mean[:, 0], want[:, 0], rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(std, want[:, 1], rtol=2e-5, atol=1e-7)
    assert sde.prior_std == r.prior_std()


@pytest.mark.parametrize('name', NAMES)
def test_drift_diffusion_and_probability_flow(name):
    sde, r = make(name)
    x, t, score, _ = random_inputs(0)
    drift, g = sde.sde(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(drift, ref._b(r.drift_coeff(t), x) * x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g, r.g(t), rtol=1e-5)
    for flow in (False, True):
        got, _ = sde.reverse(jnp.asarray(score, jnp.float32), jnp.asarray(x, jnp.float32),
                             jnp.asarray(t, jnp.float32), probability_flow=flow)
        want = ref.reverse_drift(r, x, t, score, probability_flow=flow)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _step(fn, *args):
    return [np.asarray(a, np.float64) for a in fn(*[jnp.asarray(a, jnp.float32) for a in args])]


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('predictor', ['euler_maruyama', 'reverse_diffusion', 'ancestral'])
def test_predictor_steps_match_reference(name, predictor):
    if predictor == 'ancestral' and name == 'subvp':
        with pytest.raises(ValueError, match='VP or VE'):
            pc.predictor_step(predictor, make(name)[0], *[jnp.zeros((1, 2))] * 2,
                              jnp.ones((1,)), jnp.zeros((1, 2)))
        return
    sde, r = make(name)
    x, _, score, z = random_inputs(1)
    # Predictors run at the sampler's times: random ones, with the first and the last.
    grid = np.linspace(1.0, sde.sample_eps, sde.N)
    t = np.random.RandomState(1).choice(grid, size=x.shape[0])
    t[0], t[1] = grid[0], grid[-1]
    got = _step(functools.partial(pc.predictor_step, predictor, sde), score, x, t, z)
    want = getattr(ref, predictor)(r, x, t, score, z)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())


@pytest.mark.parametrize('name', NAMES)
def test_langevin_corrector_matches_reference(name):
    sde, r = make(name)
    x, t, score, z = random_inputs(2)
    got = _step(lambda s, x, t, z: pc.corrector_step(sde, s, x, t, z, 0.16), score, x, t, z)
    for g, w in zip(got, ref.langevin_corrector(r, x, t, score, z, 0.16)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_vp_discretization_is_ddpm():
    """β_i of the VP SDE with N = 1000 is DDPM's linear schedule, and its ancestral predictor
    with s = -ε / sqrt(1 - ᾱ) is Algorithm 2's step with σ² = β (fixedlarge)."""
    sde = sde_lib.VPSDE(N=1000)
    betas = reference_ddpm.beta_schedule('linear', 1000)
    np.testing.assert_allclose(sde.discrete_betas(), betas, rtol=1e-6)
    proc = reference_ddpm.Process(betas)
    x, _, eps, z = random_inputs(3)
    idx = np.array([999, 500, 10, 0])
    score = -eps / ref._b(np.sqrt(1.0 - np.cumprod(1.0 - betas)[idx]), x)
    times = np.linspace(1.0, sde.sample_eps, 1000)[999 - idx]  # the sampler times of idx
    got, got_mean = _step(functools.partial(pc.predictor_step, 'ancestral', sde), score, x,
                          times, z)
    want, _ = reference_ddpm.p_sample(proc, eps, x, idx, z, 'eps', 'fixedlarge',
                                      clip_denoised=False)
    want_mean = reference_ddpm.p_mean_variance(proc, eps, x, idx, 'eps', 'fixedlarge',
                                               clip_denoised=False)['mean']
    np.testing.assert_allclose(got_mean, want_mean, rtol=1e-5, atol=1e-5)
    # Algorithm 2 adds no noise at its last step; the predictor does (denoising comes after).
    np.testing.assert_allclose(got[:3], want[:3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name,weighting', [('vp', False), ('subvp', False), ('ve', False),
                                            ('vp', True), ('ve', True)])
def test_dsm_loss_matches_score_space_reference(name, weighting):
    """The ε-space loss equals λ(t) ‖s_θ - ∇ log p_0t‖² written in score space."""
    sde = sde_lib.get_sde(name, num_scales=1000, likelihood_weighting=weighting)
    r = ref.SDE(name)
    x0, t, z, out = random_inputs(4)
    t = np.maximum(t, 0.05)
    x_t = sde.q_sample(jnp.asarray(x0, jnp.float32), jnp.asarray(t, jnp.float32),
                       jnp.asarray(z, jnp.float32))
    got = sde.training_losses(jnp.asarray(out, jnp.float32), jnp.asarray(x0, jnp.float32), x_t,
                              jnp.asarray(t, jnp.float32), jnp.asarray(z, jnp.float32))
    score = np.asarray(sde.score_from_output(jnp.asarray(out, jnp.float32), x_t,
                                             jnp.asarray(t, jnp.float32)), np.float64)
    np.testing.assert_allclose(got, ref.dsm_loss(r, score, x0, t, z, weighting), rtol=1e-4)


def test_ncsn_levels_loss_and_labels():
    ncsn = sde_lib.NCSN(num_scales=7, sigma_min=0.03, sigma_max=3.0)
    np.testing.assert_allclose(ncsn.sigmas(), ref.ncsn_sigmas(7, 0.03, 3.0), rtol=1e-12)
    x0, _, z, out = random_inputs(5)
    i = jnp.array([0, 3, 6, 2])
    x_t = ncsn.q_sample(jnp.asarray(x0, jnp.float32), i, jnp.asarray(z, jnp.float32))
    sig = ref.ncsn_sigmas(7, 0.03, 3.0)[np.asarray(i)]
    np.testing.assert_allclose(x_t, x0 + ref._b(sig, x0) * z, rtol=1e-5, atol=1e-5)
    score = -out / ref._b(sig, x0)
    # ½ λ(σ) ‖s_θ + (x_t - x_0) / σ²‖² with λ = σ² (NCSN eq. 5-6), per pixel.
    want = 0.5 * sig ** 2 * np.mean((score + (x_t - x0) / ref._b(sig, x0) ** 2) ** 2,
                                    axis=(1, 2, 3))
    got = ncsn.training_losses(jnp.asarray(out, jnp.float32), None, x_t, i,
                               jnp.asarray(z, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # The NCSN label of σ_i is the VE SDE's label of the same σ.
    ve = sde_lib.VESDE(sigma_min=0.03, sigma_max=3.0)
    t_ve = np.log(sig / 0.03) / np.log(3.0 / 0.03)
    np.testing.assert_allclose(ncsn.time_label(i), ve.time_label(jnp.asarray(t_ve)), atol=1e-3)


def test_annealed_langevin_matches_reference_and_chunking():
    ncsn = sde_lib.NCSN(num_scales=3, sigma_min=0.05, sigma_max=1.0)
    w = np.random.RandomState(6).normal(size=(2,)) * 0.5

    def model_apply(params, x, label):  # a fixed nonlinear ε-network of x and the label
        return jnp.tanh(x * params + label[:, None, None, None] / 999.0)

    shape, n_each, lr = (3, 4, 4, 2), 2, 1e-2
    rng = jax.random.key(7)
    x, _ = langevin.annealed_langevin_sample(model_apply, jnp.asarray(w, jnp.float32), ncsn, rng,
                                             shape, n_steps_each=n_each, step_lr=lr,
                                             denoise=True)
    chunked, _ = langevin.annealed_langevin_sample(model_apply, jnp.asarray(w, jnp.float32), ncsn,
                                                   rng, shape, n_steps_each=n_each, step_lr=lr,
                                                   denoise=True, chunk_size=4)
    np.testing.assert_array_equal(x, chunked)
    total = 3 * n_each
    x_init = np.asarray(jax.random.uniform(jax.random.fold_in(rng, total), shape, jnp.float32,
                                           -1.0, 1.0), np.float64)
    noises = [np.asarray(jax.random.normal(jax.random.fold_in(rng, k), shape), np.float64)
              for k in range(total)]
    sigmas = ref.ncsn_sigmas(3, 0.05, 1.0)

    def score_fn(x, level):
        label = 999.0 * (1.0 - level / 2.0)
        return -np.tanh(x * w + label / 999.0) / sigmas[level]

    want = ref.annealed_langevin(score_fn, x_init, sigmas, n_each, lr, noises)
    want = want + sigmas[-1] ** 2 * score_fn(want, 2)  # the final denoising step
    np.testing.assert_allclose(x, want, rtol=1e-4, atol=1e-4)


def test_pc_sampler_noise_contract_and_chunking():
    """pc_sample draws x_T from fold_in(rng, N) and step i's noise from fold_in(rng, i); chunked
    and single-scan runs agree bit for bit; a 25-step reference run agrees to float32 (N ≥ 21
    keeps VP's β_i = β(t) / N below 1)."""
    sde, r = make('vp', N=25)
    w = 0.7

    def model_apply(params, x, label):
        return jnp.sin(params * x) + label[:, None, None, None] / 999.0

    rng, shape = jax.random.key(8), (2, 3, 3, 1)
    kwargs = dict(predictor='reverse_diffusion', corrector='langevin', snr=0.2)
    x, _ = pc.pc_sample(model_apply, w, sde, rng, shape, **kwargs)
    chunked, snaps = pc.pc_sample(model_apply, w, sde, rng, shape, chunk_size=10, **kwargs)
    np.testing.assert_array_equal(x, chunked)
    assert snaps.shape == (3,) + shape
    y = np.asarray(jax.random.normal(jax.random.fold_in(rng, 25), shape), np.float64)
    times = np.linspace(1.0, sde.sample_eps, 25)
    for i, t in enumerate(times):
        tv = np.full(shape[0], t)
        step_rng = jax.random.fold_in(rng, i)
        std = r.moments(t)[1]
        # Song et al.'s order: the corrector at t_k, then the predictor from t_k.
        z = np.asarray(jax.random.normal(jax.random.fold_in(step_rng, 1), shape), np.float64)
        y, _ = ref.langevin_corrector(r, y, tv, -(np.sin(w * y) + t) / std, z, 0.2)
        z = np.asarray(jax.random.normal(step_rng, shape), np.float64)
        y, mean = ref.reverse_diffusion(r, y, tv, -(np.sin(w * y) + t) / std, z)
    np.testing.assert_allclose(x, mean, rtol=1e-4, atol=1e-4)


def test_process_from_config_and_its_errors():
    from configs import tiny
    config = tiny.get_config()
    for name, kind in (('vp', sde_lib.VPSDE), ('subvp', sde_lib.SubVPSDE), ('ve', sde_lib.VESDE),
                       ('ncsn', sde_lib.NCSN)):
        config.diffusion.process = name
        assert type(train.make_diffusion(config.diffusion)) is kind
    config.diffusion.process = 'vp'
    assert train.make_diffusion(config.diffusion).sample_eps == 1e-3
    config.diffusion.sample_eps = 1e-4
    assert train.make_diffusion(config.diffusion).sample_eps == 1e-4
    config.diffusion.process = 'cld'
    with pytest.raises(ValueError, match='diffusion.process'):
        train.make_diffusion(config.diffusion)
    config.diffusion.process, config.diffusion.mean_type = 've', 'x0'
    with pytest.raises(ValueError, match='ε-network'):
        train.make_diffusion(config.diffusion)


@pytest.mark.parametrize('name', ['vp', 've'])
def test_each_sampler_time_uses_its_own_discrete_index(name):
    """The k-th of the N sampler times falls on chain index N - 1 - k, each index once (as
    Song et al.'s truncation t (N - 1) gives in exact arithmetic; rounding would use the middle
    index twice for VP's ε = 1e-3 and never reach index 0)."""
    sde = sde_lib.get_sde(name, num_scales=1000)
    times = np.linspace(1.0, sde.sample_eps, 1000)  # float64: the reference's own grid
    np.testing.assert_array_equal(ref.index(make(name, N=1000)[1], times), 999 - np.arange(1000))
    np.testing.assert_array_equal(np.asarray(sde.discrete_index(sde.timesteps())),
                                  999 - np.arange(1000))

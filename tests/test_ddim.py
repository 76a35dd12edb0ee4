"""DDIM (`diffusion_jax.sampling.ddim`) against the float64 reference, the ancestral sampler and
an exact score.

The reference chain uses `reference_ddpm.ddim_step` (DDIM eqs. 12 and 16, float64) with the noise
drawn exactly as the sampler's contract states and the toy network of test_sampling.py.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_python
from diffusion_jax import sampling
from diffusion_jax import train
from diffusion_jax.diffusion import Diffusion
from diffusion_jax.sampling import (ancestral_sample, ddim_encode, ddim_sample,
                                    timestep_sequence)
from diffusion_jax.schedules import get_beta_schedule

try:
    from tests import reference_ddpm as ref
except ImportError:  # pragma: no cover
    import reference_ddpm as ref

SHAPE = (3, 4, 4, 2)


pytestmark = pytest.mark.usefixtures('fast_compiles')


@functools.cache
def toy_apply(groups=1):
    """A deterministic "network" with a NumPy twin: a x + b t / 1000 in the first C channels, then
    c times that and a constant logit (for the dual and learned-variance layouts). Cached: the
    function is a static argument of the jitted samplers."""
    def apply(params, x, t):
        out = params['a'] * x + params['b'] * t[:, None, None, None] / 1000.0
        return jnp.concatenate([out, params['c'] * out, params['logit'] + 0 * out][:groups],
                               axis=-1)
    return apply


def toy_apply_np(p, x, t, groups=1):
    out = p['a'] * x + p['b'] * np.asarray(t, np.float64)[:, None, None, None] / 1000.0
    return np.concatenate([out, p['c'] * out, p['logit'] + 0 * out][:groups], axis=-1)


def toy_params(seed):
    """Random float32 parameters as JAX scalars and as the same values in Python floats."""
    rng = np.random.default_rng(seed)
    values = dict(a=rng.uniform(0.6, 1.2), b=rng.uniform(-1, 1), c=rng.uniform(0.5, 1.5),
                  logit=rng.uniform(-1, 1))
    values = {k: float(np.float32(v)) for k, v in values.items()}
    return {k: jnp.float32(v) for k, v in values.items()}, values


def contract_noise(rng, shape, num_timesteps):
    x_T = np.asarray(jax.random.normal(jax.random.fold_in(rng, num_timesteps), shape), np.float64)
    noise = {t: np.asarray(jax.random.normal(jax.random.fold_in(rng, t), shape), np.float64)
             for t in range(num_timesteps)}
    return x_T, noise


def reference_ddim(proc, p, groups, levels, x, noise, eta, mean_type, clip):
    """float64 DDIM over `levels` (decreasing), ending at the data; returns (x_0, {t: x̂_0})."""
    preds = {}
    for t, s in zip(levels, list(levels[1:]) + [-1]):
        tb = np.full(x.shape[0], t)
        out = toy_apply_np(p, x, tb, groups)
        preds[t] = ref.p_mean_variance(proc, out, x, tb, mean_type, 'fixedsmall', clip)['pred_x0']
        x = ref.ddim_step(proc, x, t, s, preds[t], eta, noise[t])
    return x, preds


# -------------------------------------------------------------------------------------------------
# Timestep sequences
# -------------------------------------------------------------------------------------------------


def test_timestep_sequences():
    np.testing.assert_array_equal(timestep_sequence(1000, 10, 'leading'), np.arange(10) * 100)
    np.testing.assert_array_equal(timestep_sequence(1000, 10, 'trailing'),
                                  np.arange(1, 11) * 100 - 1)
    for spacing in ('leading', 'trailing', '20', '10,10'):
        np.testing.assert_array_equal(timestep_sequence(20, 20, spacing), np.arange(20))
    # IDDPM section counts: 300 steps in thirds; 10 evenly spaced steps in the first 100 are
    # 0, 11, ..., 99, and every section starts at its first timestep and ends at its last.
    steps = timestep_sequence(300, 45, '10,15,20')
    np.testing.assert_array_equal(steps[:10], np.arange(10) * 11)
    assert steps[10] == 100 and steps[24] == 199 and steps[25] == 200 and steps[-1] == 299
    assert len(steps) == 45 and np.all(np.diff(steps) > 0)
    # An uneven split: the first section takes the remainder.
    np.testing.assert_array_equal(timestep_sequence(7, 4, '2,2'), [0, 3, 4, 6])
    for spacing in ('leading', 'trailing', '3,4'):
        steps = timestep_sequence(1000, 7, spacing)
        assert steps.dtype == np.int32 and len(set(steps.tolist())) == 7
        assert steps.min() >= 0 and steps.max() <= 999


@pytest.mark.parametrize('num_steps, spacing, match', [
    (0, 'leading', 'num_steps'), (21, 'leading', 'num_steps'), (5, 'middle', 'spacing'),
    (5, '2,2', 'add up'), (12, '11,1', 'section of 10')])
def test_timestep_sequence_errors(num_steps, spacing, match):
    with pytest.raises(ValueError, match=match):
        timestep_sequence(20, num_steps, spacing)


# -------------------------------------------------------------------------------------------------
# Against the float64 reference
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('mean_type', ['eps', 'x0', 'dual'])
@pytest.mark.parametrize('eta, spacing, clip', [(0.0, 'leading', True), (0.5, 'trailing', False),
                                                (1.0, '2,3', True)])
def test_ddim_matches_float64_reference(mean_type, eta, spacing, clip):
    num_timesteps, num_steps = 50, 5
    groups = 3 if mean_type == 'dual' else 1
    params, p = toy_params(7)
    diffusion = Diffusion.create(get_beta_schedule('linear', num_timesteps), mean_type=mean_type,
                                 var_type='fixedsmall')
    proc = ref.Process(ref.beta_schedule('linear', num_timesteps))
    rng = jax.random.key(11)
    x_T, noise = contract_noise(rng, SHAPE, num_timesteps)
    levels = list(timestep_sequence(num_timesteps, num_steps, spacing)[::-1])
    want, preds = reference_ddim(proc, p, groups, levels, x_T, noise, eta, mean_type, clip)
    got, snaps = ddim_sample(toy_apply(groups), params, diffusion, rng, SHAPE, num_steps=num_steps,
                             eta=eta, spacing=spacing, clip_denoised=clip, chunk_size=2)
    assert snaps.shape == (3,) + SHAPE  # chunks of 2, 2, 1 steps
    scale = 1.0 + np.max(np.abs(want))
    np.testing.assert_allclose(got, want, atol=2e-5 * scale)
    for k, t in enumerate([levels[1], levels[3], levels[4]]):  # the last step of each chunk
        np.testing.assert_allclose(snaps[k], preds[t], atol=2e-5 * scale)
    if clip:
        assert any(np.max(np.abs(v)) == 1.0 for v in preds.values())  # clipping was exercised


@pytest.mark.parametrize('mean_type', ['eps', 'x0'])
def test_ddim_eta1_over_all_steps_is_the_ancestral_sampler(mean_type):
    """η = 1 with every one of T = 1000 steps is Algorithm 2 with the β̃ variance (DDIM §4.1)."""
    params, _ = toy_params(3)
    diffusion = Diffusion.create(get_beta_schedule('linear', 1000), mean_type=mean_type,
                                 var_type='fixedsmall')
    rng = jax.random.key(5)
    want, _ = ancestral_sample(toy_apply(), params, diffusion, rng, SHAPE)
    got, _ = ddim_sample(toy_apply(), params, diffusion, rng, SHAPE, num_steps=1000, eta=1.0)
    # Two float32 evaluations of the same chain (measured max difference 5e-6).
    np.testing.assert_allclose(got, want, atol=5e-5)
    other, _ = ddim_sample(toy_apply(), params, diffusion, rng, SHAPE, num_steps=1000, eta=0.0)
    assert np.max(np.abs(other - want)) > 0.1  # η matters: the test can tell samplers apart


def test_ddim_ignores_a_learned_variance():
    params, _ = toy_params(4)
    kwargs = dict(num_steps=4, eta=0.3, spacing='trailing')
    learned = Diffusion.create(get_beta_schedule('linear', 40), var_type='learned_range',
                               loss_type='hybrid')
    fixed = Diffusion.create(get_beta_schedule('linear', 40), var_type='fixedsmall')
    # [mean | c · mean as the variance]: the variance part must not matter.
    got, _ = ddim_sample(toy_apply(2), params, learned, jax.random.key(0), SHAPE, **kwargs)
    want, _ = ddim_sample(toy_apply(), params, fixed, jax.random.key(0), SHAPE, **kwargs)
    np.testing.assert_allclose(got, want, atol=1e-6)


# -------------------------------------------------------------------------------------------------
# Encoding with an exact score
# -------------------------------------------------------------------------------------------------


def _gaussian_eps(mu, s, diffusion):
    """The exact ε(x_t, t) = E[ε | x_t] for data ~ N(mu, s² I), under which
    x_t ~ N(sqrt(ᾱ) mu, ᾱ s² + 1 - ᾱ)."""
    def apply(params, x, t):
        ab = diffusion.alphas_cumprod[t][:, None, None, None]
        return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * mu) / (ab * s ** 2 + 1 - ab)
    return apply


def test_ddim_encode_follows_the_exact_flow_and_decodes_back():
    """For Gaussian data the probability-flow map is affine: x_t = sqrt(ᾱ_t) mu +
    sqrt(ᾱ_t s² + 1 - ᾱ_t) (x_0 - mu) / s. DDIM encoding with the exact ε must follow it, with
    an error that shrinks with the step size, and decoding must return the data."""
    mu, s = 0.3, 0.5
    diffusion = Diffusion.create(get_beta_schedule('linear', 1000))
    apply = _gaussian_eps(mu, s, diffusion)
    x0 = mu + s * np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    ab = float(np.cumprod(1 - np.asarray(get_beta_schedule('linear', 1000)))[-1])
    exact = np.sqrt(ab) * mu + np.sqrt(ab * s ** 2 + 1 - ab) * (x0 - mu) / s
    errors = {}
    for steps in (50, 500):
        latent = ddim_encode(apply, None, diffusion, x0, num_steps=steps, spacing='trailing')
        errors[steps] = float(np.max(np.abs(latent - exact)))
        back, _ = ddim_sample(apply, None, diffusion, jax.random.key(0), SHAPE, num_steps=steps,
                              spacing='trailing', eta=0.0, clip_denoised=False, x_T=latent)
        # Measured 0.126 at 50 steps, 0.014 at 500 (first order: error ~ 1 / steps).
        assert errors[steps] < 8 / steps, errors
        assert np.max(np.abs(back - x0)) < 8 / steps, (steps, np.max(np.abs(back - x0)))
    assert errors[50] / errors[500] > 6, errors  # converges at first order, not slower


# -------------------------------------------------------------------------------------------------
# From a config
# -------------------------------------------------------------------------------------------------


def test_sampler_from_config_and_its_errors():
    from configs import tiny
    config = tiny.get_config()
    diffusion = train.make_diffusion(config.diffusion)
    params, _ = toy_params(2)
    shape = (2, 8, 8, 1)
    config.sampling.sampler = 'ddim'
    config.sampling.num_steps = 5
    x0, snaps = sampling.sample_batch(config.sampling, toy_apply(), params, diffusion,
                                      jax.random.key(0), shape, progress=False)
    # chunk_size 5 of T = 20 steps -> chunks of 2 DDIM steps: 3 snapshots for 5 steps.
    assert x0.shape == shape and snaps.shape == (3,) + shape
    want, _ = ddim_sample(toy_apply(), params, diffusion, jax.random.key(0), shape, num_steps=5,
                          chunk_size=2)
    np.testing.assert_array_equal(x0, want)
    for field, value, match in (('sampler', 'plms', 'sampling.sampler'),
                                ('eta', 1.5, 'sampling.eta'),
                                ('num_steps', 50, 'num_steps'),
                                ('timestep_spacing', 'even', 'spacing')):
        bad = config.sampling.copy_and_resolve_references()
        bad[field] = value
        with pytest.raises(ValueError, match=match):
            sampling.check_sampling_config(bad, diffusion)


def test_few_step_study_script_runs_on_tiny(tmp_path, data_dir):
    """One variant (dual, the new parameterization) end to end: training, bits/dim, DDIM at two
    step counts, the report files. More variants only repeat the same loop."""
    workdir, docs = tmp_path / 'study', tmp_path / 'docs'
    docs.mkdir()
    (docs / 'few_step_study.md').write_text('the page')  # Written by hand: never overwritten.
    run_python(['scripts/few_step_study.py', '--config=configs/tiny.py', f'--workdir={workdir}',
                f'--config.data.data_dir={data_dir}', '--variants=dual', '--steps=2,20',
                '--num_samples=16', '--bpd_images=16', f'--docs_dir={docs}'], num_devices=2,
               fast_compiles=True)
    report = json.loads((docs / 'few_step_study.json').read_text())
    rows = {(r['variant'], r['steps']): r for r in report['rows']}
    assert set(rows) == {('dual', 2), ('dual', 20)}
    for r in rows.values():
        # 6 training steps: a bound far above a trained model's, but finite.
        assert r['train_steps'] == 6 and 0 < r['bits_per_dim'] < 1000
    assert rows['dual', 2]['bits_per_dim'] == rows['dual', 20]['bits_per_dim']  # one per model
    assert (docs / 'few_step_study.png').stat().st_size > 1000
    assert (docs / 'few_step_study.md').read_text() == 'the page'
    table = (docs / 'few_step_study_table.md').read_text()
    assert '| steps | dual |' in table and '| 20 |' in table and 'bits/dim' in table
    assert (workdir / 'dual' / 'samples_ddim2.png').exists()
    assert (workdir / 'dual' / 'checkpoints').is_dir()

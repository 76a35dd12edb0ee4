"""The ancestral sampler (`diffusion_jax.sampling.ancestral`) against a float64 NumPy Algorithm 2.

Ho et al. (2020), Algorithm 2: x_T ~ N(0, I); for t = T .. 1: z ~ N(0, I) if t > 1 else 0,
x_{t-1} = mu_theta(x_t, t) + sigma_t z. In 0-indexed code time, the sampler's contract is that
x_T = normal(fold_in(rng, T)) and the z of step t is normal(fold_in(rng, t)); the reference below
draws exactly that noise with jax.random, converts it to float64 and runs the chain in float64 with
the tables and the per-step math of `tests/reference_ddpm.py` (written from the paper, not from the
package) and a toy network that has the same closed form in JAX and NumPy.

Achieved max abs errors (jax 0.10.2, CPU, T = 20) of the final samples and x̂_0 snapshots against
the float64 chain, values of order 1: eps and x0 <= 8.5e-7 (tolerance ATOL = 1e-5); xprev
<= 7.8e-6 (its x̂_0 divides by posterior_mean_coef1 ~ 0.1; tolerance 3 ATOL).
"""

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.diffusion import Diffusion
from diffusion_jax.models import UNet
from diffusion_jax.sampling import ancestral_sample, reverse_steps, snapshot_timesteps
from diffusion_jax.schedules import get_beta_schedule

try:  # `tests` is not a package: import the reference by either route pytest may set up.
    from tests import reference_ddpm as ref
except ImportError:  # pragma: no cover
    import reference_ddpm as ref

T = 20
SHAPE = (3, 4, 4, 2)  # B, H, W, C for the toy network.
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures('fast_compiles')


# -------------------------------------------------------------------------------------------------
# The toy network, in JAX and in NumPy
# -------------------------------------------------------------------------------------------------


def toy_apply(params, x, t):
    """A deterministic "network": a x + b t / T. One function object, reused (a static jit arg)."""
    return params['a'] * x + params['b'] * t[:, None, None, None] / T


def toy_apply_np(a, b, x, t):
    return a * x + b * np.asarray(t, np.float64)[:, None, None, None] / T


def toy_params(seed):
    """Random float32 (a, b); the reference uses the same float32 values in float64."""
    rng = np.random.default_rng(seed)
    a = np.float32(rng.uniform(0.6, 1.2))
    b = np.float32(rng.uniform(-1.0, 1.0))
    return dict(a=jnp.asarray(a), b=jnp.asarray(b)), float(a), float(b)


def diffusion_for(mean_type, var_type):
    return Diffusion.create(get_beta_schedule('linear', T), mean_type=mean_type, var_type=var_type)


def contract_noise(rng, shape):
    """x_T and the per-step noise exactly as the sampler's contract states, as float64."""
    x_T = np.asarray(jax.random.normal(jax.random.fold_in(rng, T), shape, jnp.float32), np.float64)
    noises = [np.asarray(jax.random.normal(jax.random.fold_in(rng, t), shape, jnp.float32),
                         np.float64) for t in range(T)]
    return x_T, noises


def reference_chain(a, b, mean_type, var_type, clip, x_start, t_start, num_steps, noises):
    """float64 Algorithm 2 from x_{t_start} for `num_steps` steps.

    Returns (x after the last step, {t: x̂_0 predicted at step t}, whether clipping changed x̂_0).
    """
    proc = ref.Process(ref.beta_schedule('linear', T))
    x = np.array(x_start, np.float64)
    preds = {}
    clip_active = False
    for t_scalar in range(t_start, t_start - num_steps, -1):
        t = np.full(x.shape[0], t_scalar)
        out = toy_apply_np(a, b, x, t)
        raw = ref.p_mean_variance(proc, out, x, t, mean_type, var_type, False)['pred_x0']
        clip_active |= bool(np.any(np.abs(raw) > 1.0))
        x, preds[t_scalar] = ref.p_sample(proc, out, x, t, noises[t_scalar], mean_type, var_type,
                                          clip)
    return x, preds, clip_active


def max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# -------------------------------------------------------------------------------------------------
# Against the float64 reference
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('clip', [True, False], ids=['clip', 'noclip'])
@pytest.mark.parametrize('var_type', ['fixedlarge', 'fixedsmall'])
@pytest.mark.parametrize('mean_type', ['eps', 'x0', 'xprev'])
def test_ancestral_sample_matches_float64_algorithm2(mean_type, var_type, clip):
    seed = zlib.crc32(f'{mean_type}-{var_type}-{clip}'.encode()) % 1000  # deterministic
    params, a, b = toy_params(seed)
    rng = jax.random.key(seed)
    x_T, noises = contract_noise(rng, SHAPE)
    want_x0, want_preds, clip_active = reference_chain(a, b, mean_type, var_type, clip, x_T, T - 1,
                                                       T, noises)
    if clip and mean_type != 'xprev':
        # Otherwise clip on / off would not be told apart (xprev's mean ignores the clipping).
        assert clip_active

    diffusion = diffusion_for(mean_type, var_type)
    chunk = 6  # T = 20: chunks of 6, 6, 6, 2 steps; snapshots at t = 14, 8, 2, 0.
    x0, snaps = ancestral_sample(toy_apply, params, diffusion, rng, SHAPE, clip_denoised=clip,
                                 chunk_size=chunk)
    assert x0.dtype == jnp.float32 and x0.shape == SHAPE
    ts = snapshot_timesteps(T, chunk)
    np.testing.assert_array_equal(ts, [14, 8, 2, 0])
    assert snaps.shape == (len(ts),) + SHAPE
    tol = 3 * ATOL if mean_type == 'xprev' else ATOL
    assert max_err(x0, want_x0) < tol, max_err(x0, want_x0)
    for k, t in enumerate(ts):
        assert max_err(snaps[k], want_preds[int(t)]) < tol, (t, max_err(snaps[k], want_preds[t]))
    # The snapshots are the x̂_0 of those steps and not of neighbouring ones (where the reference
    # tells them apart; xprev with clipping saturates x̂_0 at +-1 everywhere).
    distinguishable = 0
    for k, t in enumerate(ts[:-1]):
        for n in (int(t) - 1, int(t) + 1):
            if max_err(want_preds[int(t)], want_preds[n]) > 200 * ATOL:
                distinguishable += 1
                assert max_err(snaps[k], want_preds[n]) > 100 * ATOL
    if not (clip and mean_type == 'xprev'):
        assert distinguishable == 2 * (len(ts) - 1)


def test_single_scan_matches_reference_and_last_step_is_noiseless():
    """chunk_size=None: one snapshot (x̂_0 at t = 0). The final step adds no noise: the reference
    returns the mean of p(x_0 | x_1), and mean + sigma_0 z would be far more than ATOL away."""
    params, a, b = toy_params(7)
    rng = jax.random.key(123)
    x_T, noises = contract_noise(rng, SHAPE)
    diffusion = diffusion_for('eps', 'fixedlarge')
    x0, snaps = ancestral_sample(toy_apply, params, diffusion, rng, SHAPE, clip_denoised=True,
                                 chunk_size=None, progress=True)
    assert snaps.shape == (1,) + SHAPE
    want_x0, want_preds, _ = reference_chain(a, b, 'eps', 'fixedlarge', True, x_T, T - 1, T,
                                             noises)
    assert max_err(x0, want_x0) < ATOL
    assert max_err(snaps[0], want_preds[0]) < ATOL
    # The literal Algorithm 2 line 4 with z != 0 at t = 0 would be this far off:
    proc = ref.Process(ref.beta_schedule('linear', T))
    sigma0 = math.sqrt(math.exp(proc.fixedlarge_logvar[0]))
    assert sigma0 * np.max(np.abs(noises[0])) > 100 * ATOL


def test_reverse_steps_partial_chain():
    """reverse_steps from x_9 for 4 steps gives x_5 and the x̂_0 of step t = 6."""
    params, a, b = toy_params(11)
    rng = jax.random.key(5)
    _, noises = contract_noise(rng, SHAPE)
    x_start = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
    diffusion = diffusion_for('x0', 'fixedsmall')
    x, pred = reverse_steps(toy_apply, params, diffusion, jnp.asarray(x_start), rng, jnp.int32(9),
                            num_steps=4, clip_denoised=True)
    want_x, want_preds, _ = reference_chain(a, b, 'x0', 'fixedsmall', True, x_start, 9, 4, noises)
    assert sorted(want_preds) == [6, 7, 8, 9]
    assert max_err(x, want_x) < ATOL
    assert max_err(pred, want_preds[6]) < ATOL


def test_sharding_does_not_change_samples():
    params, _, _ = toy_params(2)
    rng = jax.random.key(9)
    diffusion = diffusion_for('eps', 'fixedlarge')
    mesh = jax.make_mesh((1,), ('data',))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    plain = ancestral_sample(toy_apply, params, diffusion, rng, SHAPE, chunk_size=10)
    sharded = ancestral_sample(toy_apply, params, diffusion, rng, SHAPE, chunk_size=10,
                               sharding=sharding)
    np.testing.assert_array_equal(np.asarray(plain[0]), np.asarray(sharded[0]))
    np.testing.assert_array_equal(np.asarray(plain[1]), np.asarray(sharded[1]))


# -------------------------------------------------------------------------------------------------
# Chunking: bitwise equal to one scan, with the real U-Net
# -------------------------------------------------------------------------------------------------


UNET = UNet(ch=8, out_ch=1, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
            num_groups=4)
UNET_SHAPE = (2, 8, 8, 1)


def unet_apply(params, x, t):
    """One function object for every call (it is a static argument of the jitted scan)."""
    return UNET.apply(params, x, t)


@pytest.fixture(scope='module')
def unet_params():
    variables = jax.jit(UNET.init)(jax.random.key(0), jnp.zeros(UNET_SHAPE, jnp.float32),
                                   jnp.zeros((UNET_SHAPE[0],), jnp.int32))
    # The output conv is zero-initialised: perturb every parameter so the output is not ~0.
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda p: p + jnp.asarray(0.05 * rng.standard_normal(p.shape), jnp.float32), variables)


def test_chunked_equals_single_scan_bitwise(unet_params, fast_compiles):
    """With XLA's optimizations as users run it (the other tests turn most of them off)."""
    jax.config.update('jax_disable_most_optimizations', fast_compiles)
    try:
        _check_chunked_equals_single_scan(unet_params)
    finally:
        jax.config.update('jax_disable_most_optimizations', True)


def _check_chunked_equals_single_scan(unet_params):
    x = jnp.asarray(np.random.default_rng(1).standard_normal(UNET_SHAPE), jnp.float32)
    out = unet_apply(unet_params, x, jnp.array([3, 17], jnp.int32))
    assert float(jnp.std(out)) > 0.05  # the network is not trivially zero

    diffusion = diffusion_for('eps', 'fixedlarge')
    rng = jax.random.key(42)
    results = {c: ancestral_sample(unet_apply, unet_params, diffusion, rng, UNET_SHAPE,
                                   clip_denoised=True, chunk_size=c)
               for c in (None, 7, 5)}
    full_x, full_snaps = (np.asarray(v) for v in results[None])
    assert np.all(np.isfinite(full_x))
    for c in (7, 5):
        x0, snaps = (np.asarray(v) for v in results[c])
        assert snaps.shape == (math.ceil(T / c),) + UNET_SHAPE
        assert len(snapshot_timesteps(T, c)) == snaps.shape[0]
        np.testing.assert_array_equal(x0, full_x)  # bitwise
        np.testing.assert_array_equal(snaps[-1], full_snaps[0])  # x̂_0 at t = 0, bitwise
    # Snapshots taken at different t differ (they are not all the final prediction).
    snaps5 = np.asarray(results[5][1])
    assert all(np.max(np.abs(snaps5[k] - snaps5[-1])) > 1e-3 for k in range(len(snaps5) - 1))
    # A different key gives a different sample (the key is actually used).
    other = ancestral_sample(unet_apply, unet_params, diffusion, jax.random.key(43), UNET_SHAPE,
                             chunk_size=None)[0]
    assert np.max(np.abs(np.asarray(other) - full_x)) > 0.1


# -------------------------------------------------------------------------------------------------
# snapshot_timesteps and argument checks
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('num_timesteps,chunk', [(20, 7), (20, 5), (20, 1), (20, 20), (20, 50),
                                                 (1000, 50), (1000, 300), (7, 3)])
def test_snapshot_timesteps(num_timesteps, chunk):
    """Chunk k runs t = T-1-k*c down to max(T-(k+1)*c, 0); its snapshot is at the last one."""
    got = snapshot_timesteps(num_timesteps, chunk)
    n = math.ceil(num_timesteps / chunk)
    want = [max(num_timesteps - (k + 1) * chunk, 0) for k in range(n)]
    np.testing.assert_array_equal(got, want)
    assert len(got) == n and got[-1] == 0


@pytest.mark.parametrize('bad', [0, -1, -7])
def test_bad_chunk_size_raises(bad):
    params, _, _ = toy_params(0)
    with pytest.raises(ValueError):
        ancestral_sample(toy_apply, params, diffusion_for('eps', 'fixedlarge'), jax.random.key(0),
                         SHAPE, chunk_size=bad)


def test_interpolation_endpoints_are_the_encoded_sources_decoded():
    """λ = 0 and 1 decode q_sample(x0_a) and q_sample(x0_b) with the shared encoder noise, and
    the reverse noise is the same for every λ (a mix of two equal images gives one image)."""
    from diffusion_jax.sampling import interpolate, reverse_chain

    diffusion = Diffusion.create(get_beta_schedule('linear', 20))
    model_apply = _interp_model_apply
    params = {'a': jnp.float32(0.3), 'b': jnp.float32(0.1)}
    rng_np = np.random.default_rng(5)
    x0_a = jnp.asarray(rng_np.uniform(-1, 1, (2, 4, 4, 1)), jnp.float32)
    x0_b = jnp.asarray(rng_np.uniform(-1, 1, (2, 4, 4, 1)), jnp.float32)
    rng = jax.random.key(9)
    out = interpolate(model_apply, params, diffusion, x0_a, x0_b, rng, t=12, num_lambdas=5,
                      chunk_size=4)
    assert out.shape == (2, 5, 4, 4, 1)
    noise = jax.random.normal(jax.random.fold_in(rng, 21), x0_a.shape)
    t_vec = jnp.full((2,), 12, jnp.int32)
    for x0, column in ((x0_a, 0), (x0_b, 4)):
        expected, _ = reverse_chain(model_apply, params, diffusion,
                                    diffusion.q_sample(x0, t_vec, noise), rng, t_start=12,
                                    chunk_size=4)
        np.testing.assert_allclose(out[:, column], expected, atol=1e-6)
    same = interpolate(model_apply, params, diffusion, x0_a, x0_a, rng, t=12, num_lambdas=3)
    np.testing.assert_allclose(same[:, 0], same[:, 2], atol=1e-6)
    np.testing.assert_allclose(same[:, 0], same[:, 1], atol=1e-5)
    assert not np.allclose(out[:, 0], out[:, 4], atol=1e-3)


def _interp_model_apply(params, x, t):
    return params['a'] * x + params['b'] * t[:, None, None, None].astype(jnp.float32) / 20.0

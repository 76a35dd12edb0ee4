"""Bits/dim over a dataset and the rate–distortion curve against float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import schedules
from diffusion_jax.evaluation import likelihood


def toy_model_apply(params, x, t):
    """A deterministic stand-in for the network: eps ≈ a·x + b·t/T."""
    return params['a'] * x + params['b'] * t[:, None, None, None].astype(jnp.float32) / 20.0


@pytest.fixture(scope='module')
def setup():
    diffusion = diffusion_lib.Diffusion.create(schedules.get_beta_schedule('linear', 20),
                                               var_type='fixedsmall')
    images = np.random.default_rng(0).integers(0, 256, (7, 4, 4, 1)).astype(np.uint8)
    params = {'a': jnp.float32(0.4), 'b': jnp.float32(-0.3)}
    return diffusion, images, params


def test_bits_per_dim_equals_the_whole_chain_bound(setup):
    """Chunked over timesteps and image batches, it equals calc_bpd_loop image by image."""
    diffusion, images, params = setup
    rng = jax.random.key(3)
    out = likelihood.bits_per_dim(toy_model_apply, params, diffusion, images, rng, batch_size=4,
                                  timestep_chunk=6, progress=False)
    x0 = images.astype(np.float32) / 127.5 - 1.0
    totals, terms, mses = [], [], []
    for b, start in enumerate(range(0, len(images), 4)):
        ref = diffusion_lib.calc_bpd_loop(lambda x, t: toy_model_apply(params, x, t), diffusion,
                                          jnp.asarray(x0[start:start + 4]),
                                          jax.random.fold_in(rng, b))
        totals.append(ref['total_bpd'])
        terms.append(ref['terms_bpd'])
        mses.append(ref['x0_mse'])
    np.testing.assert_allclose(out['total_bpd'], np.concatenate(totals), rtol=1e-5)
    np.testing.assert_allclose(out['terms_bpd'], np.concatenate(terms).mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(out['x0_mse'], np.concatenate(mses).mean(axis=0), rtol=1e-5)
    assert out['total_bpd'].shape == (7,) and out['terms_bpd'].shape == (20,)


def test_rate_distortion_matches_a_direct_sum():
    rng = np.random.default_rng(1)
    terms = rng.uniform(0, 0.1, 12)
    mse = rng.uniform(0, 0.5, 12)
    rate, distortion = likelihood.rate_distortion(terms, 0.01, mse)
    for t in range(12):
        # Holding x_t: the prior plus every term that carried x_{T-2} .. x_t (code index s > t).
        assert rate[t] == pytest.approx(0.01 + sum(terms[s] for s in range(t + 1, 12)), rel=1e-12)
        assert distortion[t] == pytest.approx(np.sqrt(mse[t]) * 255.0 / 2.0, rel=1e-12)
    assert rate[-1] == pytest.approx(0.01)
    assert np.all(np.diff(rate) <= 0)

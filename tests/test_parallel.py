"""Data parallelism: 1 vs 8 devices, jit vs shard_map, and per-replica clipping.

The 8-device runs happen in a subprocess (the device count is fixed when JAX starts), compiled
with XLA optimizations off (compiling, not running, is its time; the 1- and 8-device runs share
the setting, so what is compared is still only the sharding).
"""

import numpy as np
import pytest

from conftest import run_python


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp('multidevice') / 'results.npz'
    run_python(['tests/multidevice_check.py', str(out)], num_devices=8, fast_compiles=True)
    return dict(np.load(out))


# Adam moves a parameter by up to the learning rate (1e-3 here) per step whatever its gradient's
# size, so where a gradient is ~0 its rounding decides a sizeable part of the move: one of the
# 44,969 parameters differed by 1.7e-5 between 1 and 8 devices on an Intel Xeon with AMX
# (2026-12-06; on the AMD EPYCs all were within 1e-5). A tenth of one step's move still fails
# a wrong sharding, which moves many parameters by whole steps.
PARAMS_ATOL = 1e-4


def test_eight_devices_match_one(results):
    # Same global batch, same noise (threefry draws do not depend on the sharding); only the
    # order of the float32 reductions differs. Measured: losses equal to ~1e-7 relative.
    np.testing.assert_allclose(results['jit_8_losses'], results['jit_1_losses'], rtol=1e-5)
    np.testing.assert_allclose(results['jit_8_params'], results['jit_1_params'],
                               rtol=1e-4, atol=PARAMS_ATOL)


def test_shard_map_matches_jit(results):
    np.testing.assert_allclose(results['shard_map_8_losses'], results['jit_8_losses'],
                               rtol=1e-5)
    np.testing.assert_allclose(results['shard_map_8_params'], results['jit_8_params'],
                               rtol=1e-4, atol=PARAMS_ATOL)


def test_training_moved_the_parameters(results):
    # Guards the comparisons above against a step that silently does nothing.
    assert results['jit_1_losses'].shape == (3,)
    assert np.all(np.isfinite(results['jit_1_losses']))
    assert not np.allclose(results['jit_1_losses'][0], results['jit_1_losses'][-1])


def test_per_replica_clipping_is_clip_then_mean(results):
    """Each replica clips its own gradient to the global norm, then the mean (float64 reference)."""
    slice_grads = results['slice_grads'].astype(np.float64)
    norms = np.linalg.norm(slice_grads, axis=1)
    assert np.all(norms > 0.05), 'the clip norm must bind for this test to mean anything'
    expected = np.mean(slice_grads * np.minimum(1.0, 0.05 / norms)[:, None], axis=0)
    np.testing.assert_allclose(results['clip_grads'], expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(results['clip_loss'], np.mean(results['slice_losses']),
                               rtol=1e-5)
    # Clipping the mean instead would give a different direction: make sure the test can tell.
    mean = slice_grads.mean(axis=0)
    clipped_mean = mean * min(1.0, 0.05 / np.linalg.norm(mean))
    assert not np.allclose(clipped_mean, expected, rtol=1e-3)

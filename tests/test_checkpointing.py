"""Checkpoint integrity: fingerprints against a NumPy reference, corrupt and truncated steps
named and skipped, non-finite states refused, another model's checkpoint refused by shape."""

import glob
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from configs import tiny
from diffusion_jax import checkpointing, parallel, train, train_state

pytestmark = pytest.mark.usefixtures('fast_compiles')


def reference_fingerprint(x):
    """Two position-weighted word sums mod 2^32, in exact integer arithmetic."""
    x = np.asarray(x)
    if x.dtype == np.bool_:
        words = x.astype(np.uint64)
    elif x.dtype.itemsize == 2:
        words = x.view(np.uint16).astype(np.uint64)
    else:
        words = x.view(np.uint32).astype(np.uint64)
    words = words.reshape(-1)
    index = np.arange(words.size, dtype=np.uint64)
    mod = np.uint64(2**32)
    first = np.sum((words * (2 * index + 1)) % mod) % mod
    weight = ((index * np.uint64(0x9E3779B1)) % mod) | np.uint64(1)
    second = np.sum(((words ^ (words >> np.uint64(15))) * weight) % mod) % mod
    return f'{int(first):08x}{int(second):08x}'


@pytest.mark.parametrize('dtype,shape', [
    (np.float32, (3, 5, 7)), (np.float32, ()), (np.int32, (11,)), (ml_dtypes.bfloat16, (4, 6)),
    (np.bool_, (9,)), (np.float32, (2, 3, 4, 5))])
def test_fingerprint_matches_reference(dtype, shape):
    rng = np.random.default_rng(sum(shape) + len(shape))
    x = (rng.normal(size=shape) * 100).astype(dtype)
    prints, non_finite = checkpointing.fingerprints({'x': x})
    assert prints == {'x': reference_fingerprint(x)}
    assert non_finite == []


def test_fingerprint_changes_with_any_single_word_and_with_order():
    x = np.random.default_rng(0).normal(size=(6, 10)).astype(np.float32)
    base = checkpointing.fingerprints({'x': x})[0]['x']
    for i in np.random.default_rng(1).choice(x.size, 20, replace=False):
        y = x.copy().reshape(-1)
        y.view(np.uint32)[i] ^= np.uint32(1 << int(i % 32))  # One flipped bit.
        assert checkpointing.fingerprints({'x': y.reshape(x.shape)})[0]['x'] != base
    # Same values, other positions: a plain sum would not notice.
    assert checkpointing.fingerprints({'x': x[::-1]})[0]['x'] != base


def test_non_finite_arrays_are_named():
    state = {'a': np.ones(3, np.float32), 'b': np.array([1, np.nan], np.float32),
             'c': np.array([np.inf], np.float32), 'n': np.arange(3)}
    assert checkpointing.fingerprints(state)[1] == ['b', 'c']


@pytest.fixture(scope='module')
def saved_run(tmp_path_factory):
    """Three checkpoints (steps 1, 2, 3) of the tiny U-Net's state, each a different state."""
    config = tiny.get_config()
    model = train.make_model(config)
    optimizer = train_state.make_optimizer(config.optim)
    mesh = parallel.make_mesh()
    workdir = str(tmp_path_factory.mktemp('ckpt'))
    manager = checkpointing.make_manager(workdir, keep=5)
    state, shardings, _ = train.init_or_restore_state(config, model, optimizer, mesh, manager)
    states = {}
    for step in (1, 2, 3):
        state = state.replace(step=jnp.int32(step),
                              params=jax.tree.map(lambda p: p + 0.5, state.params))
        states[step] = jax.device_get(state)
        assert checkpointing.save(manager, step, state, {'next_batch': step, 'seed': 0},
                                  force=True)
    manager.wait_until_finished()
    abstract = checkpointing.abstract_with_shardings(jax.eval_shape(lambda: state), shardings)
    return dict(workdir=workdir, states=states, abstract=abstract, config=config, model=model,
                optimizer=optimizer, mesh=mesh)


def copy_of(saved_run, tmp_path):
    import shutil
    workdir = str(tmp_path / 'copy')
    shutil.copytree(saved_run['workdir'], workdir)
    return workdir, checkpointing.make_manager(workdir, keep=5)


def assert_states_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact(saved_run, tmp_path):
    _, manager = copy_of(saved_run, tmp_path)
    state, data_state, step = checkpointing.restore_latest(manager, saved_run['abstract'])
    assert step == 3 and data_state['next_batch'] == 3
    assert_states_equal(state, saved_run['states'][3])


def largest_data_file(workdir, step):
    files = glob.glob(os.path.join(workdir, 'checkpoints', str(step), 'state', 'ocdbt.process_*',
                                   'd', '*'))
    return max(files, key=os.path.getsize)


def damage_step_3(saved_run, tmp_path, damage, caplog):
    """(workdir, manager, restored state, step, log text) after damaging step 3's largest data
    file. 'flip' flips one bit: a byte of a value chunk that still decodes, to other values
    (silent for orbax). Which bytes those are depends on the file's layout, which the order of
    the async writes changes, so places are tried from the middle out until one is read."""
    places = [16] + [16 + d * sign for d in range(1, 16) for sign in (-1, 1)]
    for place in (places if damage == 'flip' else [None]):
        caplog.clear()
        attempt = tmp_path / (str(place) if place is not None else 'truncate')
        workdir, manager = copy_of(saved_run, attempt)
        path = largest_data_file(workdir, 3)
        if damage == 'flip':
            data = bytearray(open(path, 'rb').read())
            data[len(data) * place // 32] ^= 0x10
            open(path, 'wb').write(bytes(data))
        else:
            os.truncate(path, os.path.getsize(path) // 3)
        state, _, step = checkpointing.restore_latest(
            manager, saved_run['abstract'], quarantine_dir=os.path.join(workdir,
                                                                        'corrupt_checkpoints'))
        message = ' '.join(r.getMessage() for r in caplog.records)
        if damage != 'flip' or 'does not match its saved fingerprint' in message:
            return workdir, manager, state, step, message
    pytest.fail('no flipped byte of step 3 decoded to other values')


@pytest.mark.parametrize('damage', ['flip', 'truncate'])
def test_damaged_step_is_named_and_training_falls_back(saved_run, tmp_path, caplog, damage):
    workdir, manager, state, step, message = damage_step_3(saved_run, tmp_path, damage, caplog)
    quarantine = os.path.join(workdir, 'corrupt_checkpoints')
    assert step == 2
    assert_states_equal(state, saved_run['states'][2])
    expected = 'does not match its saved fingerprint' if damage == 'flip' else 'cannot read'
    assert 'checkpoint step 3 is corrupt' in message and expected in message, message
    # The message names an array of the state, e.g. ema_params/mid_block_1/conv1/kernel.
    names = checkpointing.leaf_names(saved_run['abstract'])
    assert any(name in message for name in names), message
    assert sorted(manager.all_steps()) == [1, 2]  # Step 3 can be saved again by the rerun.
    assert os.path.isdir(os.path.join(quarantine, '3'))  # Kept for inspection, not deleted.


def test_every_step_damaged_is_an_error_not_a_fresh_start(saved_run, tmp_path):
    workdir, manager = copy_of(saved_run, tmp_path)
    for step in (1, 2, 3):
        os.truncate(largest_data_file(workdir, step), 10)
    with pytest.raises(checkpointing.CheckpointError, match='no usable checkpoint.*step 3.*'
                       'step 2.*step 1'):
        checkpointing.restore_latest(manager, saved_run['abstract'],
                                     quarantine_dir=os.path.join(workdir, 'bad'))
    # No step restored, so none is moved: a rerun (after a fix) still finds all three.
    assert sorted(manager.all_steps()) == [1, 2, 3]
    assert not os.path.exists(os.path.join(workdir, 'bad'))


def test_non_finite_state_is_never_saved(saved_run, tmp_path):
    workdir, manager = copy_of(saved_run, tmp_path)
    state = saved_run['states'][3]
    params = dict(state.params)
    params['conv_out'] = dict(params['conv_out'], bias=np.full_like(
        params['conv_out']['bias'], np.nan))
    with pytest.raises(FloatingPointError, match='not saving step 4: params/conv_out/bias'):
        checkpointing.save(manager, 4, state.replace(params=params), {'next_batch': 4},
                           force=True)
    manager.wait_until_finished()
    assert sorted(manager.all_steps()) == [1, 2, 3]


def test_checkpoint_of_another_model_names_the_shapes(saved_run, tmp_path):
    workdir, manager = copy_of(saved_run, tmp_path)
    config = tiny.get_config()
    config.model.ch = 16
    model = train.make_model(config)
    before = sorted(glob.glob(os.path.join(workdir, '**'), recursive=True))
    with pytest.raises(checkpointing.CheckpointError) as error:
        train.init_or_restore_state(config, model, saved_run['optimizer'], saved_run['mesh'],
                                    manager, quarantine_dir=os.path.join(workdir, 'bad'))
    assert 'written for another model config' in str(error.value)
    assert 'params/conv_in/kernel: checkpoint (3, 3, 1, 8), model (3, 3, 1, 16)' in str(
        error.value)
    assert sorted(glob.glob(os.path.join(workdir, '**'), recursive=True)) == before

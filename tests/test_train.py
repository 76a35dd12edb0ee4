"""The training wiring: exact resume, the CLI end to end, configs and clear errors."""

import glob
import importlib
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from conftest import (ROOT, TINY_RUN_SAMPLE_EVERY, TINY_RUN_STEPS, run_python,
                      tiny_run_command)
from configs import tiny
from diffusion_jax import reporting, toy, train

# The in-process trainings compile with XLA optimizations off: compiling is their time, and each
# comparison is between runs made with the same setting.
pytestmark = pytest.mark.usefixtures('fast_compiles')

CONFIG_NAMES = sorted(p.stem for p in (ROOT / 'configs').glob('*.py')
                      if p.stem not in ('__init__', 'hires'))


def tiny_config(data_dir, **training):
    config = tiny.get_config()
    config.data.data_dir = data_dir
    config.sampling.num_samples = 0
    config.training.log_every = 1
    config.training.update(training)
    return config


def losses_by_step(workdir):
    rows = reporting.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
    return {row['step']: row['loss'] for row in rows}


def test_resume_equals_uninterrupted_run_bitwise(tmp_path, data_dir):
    """2k steps straight == k steps, a restart from the checkpoint, and k more (data order, RNG
    and optimizer state included)."""
    k = 4
    straight = train.train_and_evaluate(
        tiny_config(data_dir, num_train_steps=2 * k, checkpoint_every=2), str(tmp_path / 'a'))
    train.train_and_evaluate(tiny_config(data_dir, num_train_steps=k, checkpoint_every=2),
                             str(tmp_path / 'b'))
    resumed = train.train_and_evaluate(
        tiny_config(data_dir, num_train_steps=2 * k, checkpoint_every=2), str(tmp_path / 'b'))
    losses_a, losses_b = losses_by_step(tmp_path / 'a'), losses_by_step(tmp_path / 'b')
    assert sorted(losses_a) == list(range(1, 2 * k + 1))
    assert losses_b == losses_a  # Exact float equality, step for step.
    assert len(set(losses_a.values())) == 2 * k  # The loss really changes between steps.
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_main_end_to_end_and_rerun_resumes(trained_tiny, copy_of_trained_tiny, data_dir):
    """The shared trained run (conftest.trained_tiny: the CLI's train mode) wrote everything it
    promises; --mode=sample and --mode=eval on it; the same command with more steps resumes."""
    workdir = trained_tiny
    with np.load(workdir / 'samples.npz') as f:
        samples = f['images']
    assert samples.shape == (16, 8, 8, 1) and samples.dtype == np.uint8
    assert samples.std() > 0
    for name in ('samples.png', 'progressive.png', 'loss.png', 'config.json', 'metrics.jsonl'):
        assert (workdir / name).is_file(), name
    assert glob.glob(str(workdir / 'events.out.tfevents.*'))
    # A grid every sample_every steps before the last (the last step writes the final samples).
    assert sorted(os.listdir(workdir / 'sample_grids')) == [
        f'step_{step:08d}.png' for step in range(TINY_RUN_SAMPLE_EVERY, TINY_RUN_STEPS,
                                                 TINY_RUN_SAMPLE_EVERY)]
    assert set(reporting.read_metrics(workdir / 'metrics.jsonl')[0]) >= {
        'loss', 'grad_norm', 'learning_rate', 'steps_per_sec', 'images_per_sec'}
    assert (workdir / 'checkpoints' / str(TINY_RUN_STEPS)).is_dir()
    assert json.loads((workdir / 'config.json').read_text())['data']['name'] == 'digits'
    # --mode=sample and --mode=eval on a copy of the trained workdir.
    workdir = copy_of_trained_tiny
    command = tiny_run_command(workdir, data_dir)
    (workdir / 'samples.npz').unlink()
    run_python(command + ['--mode=sample'], fast_compiles=True)
    with np.load(workdir / 'samples.npz') as f:
        np.testing.assert_array_equal(f['images'], samples)  # Same seed, same EMA weights.
    run_python(command + ['--mode=eval', '--config.eval.num_images=8',
                          '--config.eval.batch_size=8', '--config.eval.timestep_chunk=7'],
               fast_compiles=True)
    results = json.loads((workdir / 'eval.json').read_text())
    assert results['num_images'] == 8 and results['step'] == TINY_RUN_STEPS
    assert 0 < results['bits_per_dim'] < 20
    assert (workdir / 'rate_distortion.png').is_file()
    assert (workdir / 'interpolation.png').is_file()
    assert len((workdir / 'rate_distortion.csv').read_text().splitlines()) == 1 + 20
    # The same command with more steps continues from the last step instead of starting over.
    more = TINY_RUN_STEPS + 2
    result = run_python(command + [f'--config.training.num_train_steps={more}'],
                        fast_compiles=True)
    assert f'Restored checkpoint at step {TINY_RUN_STEPS}' in result.stderr
    assert max(losses_by_step(workdir)) == more
    assert (workdir / 'checkpoints' / str(more)).is_dir()


@pytest.mark.parametrize('override,message', [
    ('--config.training.nope=1', "unknown config key 'training.nope'"),
    ('--config.nope.deeper=1', "unknown config key 'nope.deeper'"),
    ('--config.training.batch_size=abc', 'invalid literal for int()'),
    ('--config.diffusion.num_timesteps=1.5', 'invalid literal for int()'),
])
def test_bad_override_fails_before_anything_runs(tmp_path, override, message):
    workdir = tmp_path / 'never'
    result = run_python(['-m', 'diffusion_jax.main', '--config=configs/tiny.py',
                         f'--workdir={workdir}', override], check=False, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert not workdir.exists()


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_every_config_loads_locks_and_builds_its_model(name):
    config = importlib.import_module(f'configs.{name}').get_config()
    config.lock()
    with pytest.raises(AttributeError):
        config.training.not_a_field = 1
    assert (config.__doc__ or importlib.import_module(f'configs.{name}').__doc__).strip()
    if config.data.name == toy.DATA_NAME:  # the 2-D check's MLP (tests/test_score_cli.py)
        variables = jax.eval_shape(toy.ScoreMLP(**config.model).init, jax.random.key(0),
                                   jax.ShapeDtypeStruct((1, 2), np.float32),
                                   jax.ShapeDtypeStruct((1,), np.float32))
        assert sum(x.size for x in jax.tree.leaves(variables)) > 1000
        return
    model = train.make_model(config)
    size = config.data.image_size
    variables = jax.eval_shape(model.init, jax.random.key(0),
                               jax.ShapeDtypeStruct((1, size, size, config.data.channels),
                                                    np.float32),
                               jax.ShapeDtypeStruct((1,), np.int32),
                               **({'y': jax.ShapeDtypeStruct((1,), np.int32)}
                                  if model.label_classes else {}))
    num_params = sum(x.size for x in jax.tree.leaves(variables))
    expected = {'cifar10': 35_746_307, 'celebahq': 113_673_219, 'lsun_church': 113_673_219,
                'lsun_bedroom': 113_673_219, 'lsun_cat': 113_673_219}
    if name in expected:
        assert num_params == expected[name]


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_config_docstring_starts_with_its_command(name):
    doc = importlib.import_module(f'configs.{name}').__doc__
    assert f'--config=configs/{name}.py' in doc


def test_out_ch_mismatch_names_the_fix():
    config = tiny.get_config()
    config.diffusion.var_type = 'learned_range'
    config.diffusion.loss_type = 'hybrid'
    with pytest.raises(ValueError, match='--config.model.out_ch=2'):
        train.make_model(config)


def test_global_batch_must_divide_devices():
    from diffusion_jax import parallel
    mesh = parallel.make_mesh()
    parallel.check_global_batch(16, mesh)
    fake = type('Mesh', (), {'devices': np.zeros(8)})()
    with pytest.raises(ValueError, match='not divisible by the 8 devices'):
        parallel.check_global_batch(12, fake)


def test_readme_commands_are_the_ones_ci_runs():
    readme = (ROOT / 'README.md').read_text()
    ci = (ROOT / '.ci' / 'run').read_text()
    test_command = "pip install --no-compile -c constraints.txt -e '.[test,parity]' && pytest"
    assert test_command in readme and test_command in ci
    assert 'python -m diffusion_jax.main --config=configs/mnist.py --workdir=runs/mnist' in readme
    assert os.access(ROOT / '.ci' / 'run', os.X_OK)
    assert pathlib.Path(ROOT / 'setup.cfg').is_file()

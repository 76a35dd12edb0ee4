"""Shared test set-up: the repo root on sys.path (for configs/), a persistent XLA compilation
cache shared with subprocesses (CPU compiles of the U-Net dominate the suite's time), and one
tfds data dir per session."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(ROOT / '.pytest_cache' / 'jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import pytest  # noqa: E402


@pytest.fixture(scope='module')
def fast_compiles():
    """XLA optimizations off for a module (opt in with `pytestmark =
    pytest.mark.usefixtures('fast_compiles')`): compiling, not running, dominates the numerical
    tests on CPU. Yields the previous setting (for a test that turns them back on) and restores it
    for the other modules."""
    import jax
    previous = jax.config.values['jax_disable_most_optimizations']
    jax.config.update('jax_disable_most_optimizations', True)
    yield previous
    jax.config.update('jax_disable_most_optimizations', previous)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
    """A tfds data dir shared by the session (builders prepare into it once)."""
    return str(tmp_path_factory.mktemp('tfds'))


def python_env(*, num_devices=1, fast_compiles=False, **extra):
    """The environment of a test subprocess: `num_devices` fake CPU devices; with
    `fast_compiles`, XLA optimizations off (as the fixture of that name)."""
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(num_devices), PYTHONPATH=str(ROOT), **extra)
    if fast_compiles:
        env['JAX_DISABLE_MOST_OPTIMIZATIONS'] = 'true'
    env.pop('XLA_FLAGS', None)
    return env


def run_python(args, *, num_devices=1, timeout=900, check=True, cwd=ROOT, fast_compiles=False):
    """Runs `python args...` in a subprocess (environment: `python_env`)."""
    env = python_env(num_devices=num_devices, fast_compiles=fast_compiles)
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f'{args} failed ({result.returncode}):\n{result.stderr[-6000:]}')
    return result

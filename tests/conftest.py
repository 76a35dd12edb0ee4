"""Shared test set-up: the repo root on sys.path (for configs/), a persistent XLA compilation
cache for this run, shared with the xdist workers and every subprocess (CPU compiles of the
U-Net dominate the suite's time), one tfds data dir per run, and one trained tiny workdir per run
that the end-to-end tests read instead of each training its own.

"Per run" holds under pytest-xdist too: the workers' temporary folders are siblings, and what
is made once is made under a file lock in their common parent."""

import atexit
import hashlib
import inspect
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _compilation_cache_for_this_run():
    """A fresh cache folder, made by the first pytest process of a run (the xdist controller, or
    the only process) and inherited through the environment by the workers and subprocesses.
    Fresh, so that a local run costs what CI's does; removed when that process exits."""
    if 'JAX_COMPILATION_CACHE_DIR' in os.environ:  # a worker, or the user's own cache
        return
    path = tempfile.mkdtemp(prefix='diffusion_jax_xla_cache_')
    os.environ['JAX_COMPILATION_CACHE_DIR'] = path
    atexit.register(shutil.rmtree, path, ignore_errors=True)


_compilation_cache_for_this_run()
# The suite runs on the CPU. The test extra installs libtpu (tests/test_aot.py compiles for TPU
# slices through it), and JAX would otherwise also try to start a TPU backend in every process.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The command-line entry points restart themselves under these allocator settings
# (diffusion_jax/allocator.py); set here, every process of the suite (CLIs, scripts, notebook
# kernels) starts with them at once. tests/test_main.py checks the restart without them.
from diffusion_jax import allocator  # noqa: E402
os.environ.update(allocator.pending_settings())
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402


# The suite's tiers (docs/testing.md), one marker each: `pytest -m unit` / `reference` /
# `end_to_end`. A test is end to end when it, or a fixture of its own module it uses, starts a
# process (the CLI, a script, a notebook kernel) or reads the shared trained run; a reference
# test checks numbers against an independent float64 NumPy reference (tests/reference_*.py) or
# against the PyTorch peer; the rest are unit tests.
TIERS = ('unit', 'reference', 'end_to_end')
_STARTS_A_PROCESS = ('run_python(', 'subprocess.Popen(', 'python_env(', 'trained_tiny',
                     'nbclient', 'run_cluster(', 'run_single(',
                     # Not a process, but as long: a compile for a TPU slice (tests/test_aot.py).
                     'topology_devices(')
_REFERENCE_MODULES = ('reference_ddpm', 'reference_sde', 'torch', 'diffusers')


def _own_fixture_functions(item, info):
    """The fixture functions `item` uses that are defined in its own test module."""
    return [d.func for defs in info.name2fixturedefs.values() for d in defs
            if getattr(d.func, '__module__', None) == item.module.__name__]


def _tier(item, info):
    functions = [item.function] + _own_fixture_functions(item, info)
    source = ''.join(inspect.getsource(f) for f in functions)
    if any(sign in source for sign in _STARTS_A_PROCESS):
        return 'end_to_end'
    modules = {getattr(v, '__name__', '').rsplit('.', 1)[-1] for v in vars(item.module).values()
               if inspect.ismodule(v)}
    if modules & set(_REFERENCE_MODULES):
        return 'reference'
    return 'unit'


def pytest_configure(config):
    for tier in TIERS:
        config.addinivalue_line('markers', f'{tier}: a test of the {tier} tier (docs/testing.md)')


def pytest_itemcollected(item):
    """Marks each test with its tier. Under pytest-xdist (--dist loadgroup), the tests that share
    a module-scoped fixture of their module (a trained run, a subprocess's results) go to one
    worker, so that fixture is made once; every other test goes to whichever worker is free.
    (Here rather than in pytest_collection_modifyitems: xdist reads the groups in that hook.)"""
    info = getattr(item, '_fixtureinfo', None)
    if info is None or not hasattr(item, 'function'):
        return
    item.add_marker(getattr(pytest.mark, _tier(item, info)))
    shares = any(d.scope == 'module' and d.argname != 'fast_compiles'
                 for defs in info.name2fixturedefs.values() for d in defs)
    if shares:
        item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """pytest-xdist 3.8 groups tests by an '@group' suffix it appends to `item._nodeid`, which
    pytest 9 no longer reads (the node id lives in `item._id`): append it where pytest 9 keeps it.
    Nothing to do where xdist's own suffix took effect, or outside an xdist loadgroup worker."""
    if not config.getoption('loadgroup', False):
        return
    from _pytest.nodeid import coerce_node_id
    for item in items:
        groups = sorted({str(m.args[0]) for m in item.iter_markers('xdist_group')})
        if groups and '@' not in item.nodeid.rsplit(']', 1)[-1].rsplit('::', 1)[-1]:
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(groups)}")


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
def run_dir(tmp_path_factory):
    """A folder common to every process of this run (the xdist workers' shared parent)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base


def made_once(run_dir, name, make):
    """`run_dir / name`, made by `make(path)` in the first process that asks for it; the others
    wait on the lock and reuse it. A failed `make` leaves nothing behind, so each asker retries
    and reports the failure itself."""
    path = run_dir / name
    with FileLock(str(path) + '.lock'):
        if not (path / '.complete').exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            try:
                make(path)
            except BaseException:
                shutil.rmtree(path, ignore_errors=True)
                raise
            (path / '.complete').touch()
    return path


@pytest.fixture(scope='session')
def data_dir(run_dir):
    """A tfds data dir shared by the run (builders prepare into it once)."""
    def prepare(path):
        from diffusion_jax.data import load_split
        # Every split of the two embedded datasets, once, under the lock: tests running at the
        # same time in two workers then only read it.
        for name in ('digits', 'mnist5k'):
            load_split(name, 'train', data_dir=str(path))
    return str(made_once(run_dir, 'tfds', prepare))


# The shared trained run: configs/tiny.py for TINY_RUN_STEPS steps, a loss row every step,
# checkpoints every TINY_RUN_CHECKPOINT_EVERY steps, a sample grid at TINY_RUN_SAMPLE_EVERY and
# the final 16 samples, compiled with XLA optimizations off (as the preemption runs that compare
# their loss curves with it).
TINY_RUN_STEPS = 24
TINY_RUN_CHECKPOINT_EVERY = 6
TINY_RUN_SAMPLE_EVERY = 12


def tiny_run_command(workdir, data_dir, *overrides):
    """`python -m diffusion_jax.main` arguments of the shared run's command (overrides last)."""
    return ['-m', 'diffusion_jax.main', '--config=configs/tiny.py', f'--workdir={workdir}',
            f'--config.data.data_dir={data_dir}', '--config.training.log_every=1',
            f'--config.training.num_train_steps={TINY_RUN_STEPS}',
            f'--config.training.checkpoint_every={TINY_RUN_CHECKPOINT_EVERY}', *overrides]


@pytest.fixture(scope='session')
def trained_tiny(run_dir, data_dir):
    """The workdir of one finished tiny training run, shared by the whole run: READ ONLY (a test
    that writes into it copies it first, `copy_of_trained_tiny`)."""
    def train(path):
        run_python(tiny_run_command(path, data_dir,
                                    f'--config.training.sample_every={TINY_RUN_SAMPLE_EVERY}'),
                   fast_compiles=True)
    return made_once(run_dir, 'trained_tiny', train)


@pytest.fixture
def copy_of_trained_tiny(trained_tiny, tmp_path):
    """A private, writable copy of the shared trained workdir."""
    copy = tmp_path / 'trained_tiny'
    shutil.copytree(trained_tiny, copy)
    return copy


def file_digests(directory):
    """{relative path: SHA-256} of every file under `directory` (is a workdir unchanged?)."""
    digests = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, 'rb') as f:
                digests[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return digests


def python_env(*, num_devices=1, fast_compiles=False, **extra):
    """The environment of a test subprocess: `num_devices` fake CPU devices; with
    `fast_compiles`, XLA optimizations off (as the fixture of that name)."""
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(num_devices), PYTHONPATH=str(ROOT), **extra)
    if fast_compiles:
        env['JAX_DISABLE_MOST_OPTIMIZATIONS'] = 'true'
    env.pop('XLA_FLAGS', None)
    return env


def run_python(args, *, num_devices=1, timeout=900, check=True, cwd=ROOT, fast_compiles=False,
               env=None):
    """Runs `python args...` in a subprocess (environment: `python_env`, updated by `env`)."""
    env = dict(python_env(num_devices=num_devices, fast_compiles=fast_compiles), **(env or {}))
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f'{args} failed ({result.returncode}):\n{result.stderr[-6000:]}')
    return result

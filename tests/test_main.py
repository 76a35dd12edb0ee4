"""The entry point: its machine probing, and its restart with the allocator settings."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, python_env

from diffusion_jax import allocator
from diffusion_jax import main


def test_available_cores_follows_the_affinity_mask_or_falls_back(monkeypatch):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 3, 5}, raising=False)
    assert main.available_cores() == 3
    monkeypatch.delattr(os, 'sched_getaffinity')  # macOS has no affinity call.
    monkeypatch.setattr(os, 'cpu_count', lambda: 6)
    assert main.available_cores() == 6
    monkeypatch.setattr(os, 'cpu_count', lambda: None)
    assert main.available_cores() == 1


def test_cpu_backend_schedules_in_order_unless_the_user_chose(monkeypatch):
    # cpu_devices=0 leaves the device count alone, so this runs after JAX has started.
    monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_use_xnnpack=false')
    main.configure_cpu_backend(None, 0, fast_math=True)
    flags = os.environ['XLA_FLAGS'].split()
    assert flags == ['--xla_cpu_use_xnnpack=false', '--xla_cpu_enable_fast_math=true',
                     main.SEQUENTIAL_SCHEDULER_FLAG]
    chosen = '--xla_cpu_enable_concurrency_optimized_scheduler=true'
    monkeypatch.setenv('XLA_FLAGS', chosen)
    main.configure_cpu_backend(None, 0, fast_math=False)
    assert os.environ['XLA_FLAGS'] == chosen


def _allocator_line(tmp_path, env, **changes):
    """The 'Allocator:' log lines of a short CLI run in `env` updated by `changes` (a None
    removes the variable); the run stops at once, there being no checkpoint."""
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    result = subprocess.run(
        [sys.executable, '-m', 'diffusion_jax.main', '--config=configs/tiny.py',
         f'--workdir={tmp_path / "empty"}', '--mode=sample'], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and 'no checkpoint' in result.stderr
    return [line for line in result.stderr.splitlines() if 'Allocator: ' in line]


def test_the_cli_restarts_itself_with_the_allocator_settings(tmp_path):
    """A process started without allocator settings runs with diffusion_jax's (once: one line)."""
    ours = allocator.settings()
    if not ours:
        pytest.skip('no allocator settings on this platform')
    [line] = _allocator_line(tmp_path, allocator.without_allocator(python_env()),
                             DIFFUSION_JAX_ALLOCATOR=None)
    key = 'LD_PRELOAD' if 'LD_PRELOAD' in ours else 'GLIBC_TUNABLES'
    assert f'{key}={ours[key]} (set by diffusion_jax)' in line


def test_the_users_allocator_settings_win(tmp_path):
    [line] = _allocator_line(tmp_path, python_env(), GLIBC_TUNABLES='glibc.malloc.arena_max=2',
                             LD_PRELOAD=None)
    assert line.endswith('Allocator: GLIBC_TUNABLES=glibc.malloc.arena_max=2 (set by the user)')
    [line] = _allocator_line(tmp_path, python_env(), GLIBC_TUNABLES=None, LD_PRELOAD=None,
                             DIFFUSION_JAX_ALLOCATOR='default')
    assert line.endswith('Allocator: glibc defaults')


def test_the_allocator_runs_a_command_under_its_settings():
    """`python -m diffusion_jax.allocator COMMAND` (for a Jupyter kernel): the malloc in use is
    tbbmalloc's where the settings preload it."""
    ours = allocator.settings()
    if 'LD_PRELOAD' not in ours:
        pytest.skip('tbbmalloc is not installed here')
    env = allocator.without_allocator(python_env())
    code = "print(any('tbbmalloc_proxy' in line for line in open('/proc/self/maps')))"
    result = subprocess.run([sys.executable, '-m', 'diffusion_jax.allocator', sys.executable,
                             '-c', code], env=env, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == 'True', result.stderr
    result = subprocess.run([sys.executable, '-m', 'diffusion_jax.allocator', 'no-such-command'],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: cannot run 'no-such-command': No such file or directory"


def test_the_allocator_is_for_cpu_runs_with_glibc_and_falls_back_without_tbb(
        monkeypatch, tmp_path):
    monkeypatch.setattr(allocator, '_is_glibc_linux', lambda: True)
    monkeypatch.setattr(allocator, '_tbbmalloc_paths', lambda: ['/x/libtbbmalloc.so.2',
                                                                '/x/libtbbmalloc_proxy.so.2'])
    monkeypatch.setattr(allocator, 'ACCELERATOR_DEVICE_FILES', (str(tmp_path / 'nvidia[0-9]*'),))
    monkeypatch.delenv('JAX_PLATFORMS', raising=False)
    assert allocator.settings() == {
        'LD_PRELOAD': '/x/libtbbmalloc.so.2:/x/libtbbmalloc_proxy.so.2',
        'TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD': str(8 << 20)}
    chosen = {'LD_PRELOAD': 'x.so', 'GLIBC_TUNABLES': 'y',
              'TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD': '1'}
    assert allocator.without_allocator({**chosen, 'PATH': '/bin'}) == {'PATH': '/bin'}
    (tmp_path / 'nvidia0').touch()  # A GPU: its program's buffers are not malloc's.
    assert allocator.settings() == {}
    monkeypatch.setenv('JAX_PLATFORMS', 'cpu')  # ... unless JAX is told to run on the CPU.
    assert 'LD_PRELOAD' in allocator.settings()
    monkeypatch.setenv('JAX_PLATFORMS', 'cuda,cpu')
    assert allocator.settings() == {}
    monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
    monkeypatch.setattr(allocator, '_tbbmalloc_paths', lambda: None)  # No tbb wheel here.
    assert allocator.settings() == {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
    monkeypatch.setattr(allocator, '_is_glibc_linux', lambda: False)
    assert allocator.settings() == {}


# Freed and allocated again three times; the pages faulted in on the 2nd and 3rd allocation.
_REFAULTS = '''
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size, faults = {size}, []
for _ in range(3):
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
print((faults[3] - faults[1]) / 2 / (size // 4096))
'''


def test_the_allocator_keeps_a_step_sized_block_mapped():
    """What the allocator is for: a freed block the size of the CIFAR-10 step's temporaries
    (1.25 GiB) is reused, its pages not faulted in again at the next allocation; under glibc's
    defaults it is unmapped and faulted in anew."""
    ours = allocator.settings()
    if 'LD_PRELOAD' not in ours:
        pytest.skip('the glibc fallback (huge pages) faults fewer pages but does not keep blocks')
    code = _REFAULTS.format(size=5 << 28)

    def refaulted_fraction(changes):
        env = {**allocator.without_allocator(os.environ), **changes}
        result = subprocess.run([sys.executable, '-c', code], env=env,
                                capture_output=True, text=True, check=True, timeout=120)
        return float(result.stdout)
    assert refaulted_fraction(ours) < 0.01
    assert refaulted_fraction({}) > 0.9

"""glibc malloc settings for the command-line entry points: keep XLA's per-step buffers mapped.

Why: on the CPU, XLA allocates each execution's temporaries (tens of MB for the main job's step)
with malloc. Above glibc's mmap threshold (at most 32 MB through mallopt) every such block is a
fresh mmap, unmapped again at free: the MNIST main job spent a fifth of its CPU time in the
kernel (10.4 M minor page faults and 23 s of system time in 300 training steps, Intel Xeon with
AMX, 2026-12-06). With one arena, a 1 GiB mmap threshold and a 16 GiB trim threshold the blocks
are reused: 0.30 M faults, 1.5 s of system time, the same losses bit for bit (docs/benchmarks.md).

glibc reads these tunables only at start-up, so `reexec_with_tunables()` restarts the Python
process once with GLIBC_TUNABLES set, before JAX is imported. A GLIBC_TUNABLES or LD_PRELOAD the
user set wins (and so does DIFFUSION_JAX_ALLOCATOR=default); elsewhere than Linux with glibc it
does nothing.
"""

import os
import platform
import sys

TUNABLES = ('glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold=1073741824:'
            'glibc.malloc.trim_threshold=17179869184')
OPT_OUT = 'DIFFUSION_JAX_ALLOCATOR'  # 'default': glibc's own settings.


def _is_glibc_linux():
    return sys.platform.startswith('linux') and platform.libc_ver()[0] == 'glibc'


def reexec_with_tunables():
    """Replaces this process by the same command with GLIBC_TUNABLES=TUNABLES, when needed.

    Call first thing in a `__main__` block. Returns (doing nothing) if the tunables are set
    already, the user set their own allocator settings, or the platform has no glibc.
    """
    if (not _is_glibc_linux() or 'GLIBC_TUNABLES' in os.environ or 'LD_PRELOAD' in os.environ
            or os.environ.get(OPT_OUT) == 'default'):
        return
    argv = getattr(sys, 'orig_argv', None)
    if not argv:  # An embedded interpreter: no command to run again.
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]],
              dict(os.environ, GLIBC_TUNABLES=TUNABLES))


def describe():
    """What this process allocates with, for the log."""
    if 'LD_PRELOAD' in os.environ:
        return f'LD_PRELOAD={os.environ["LD_PRELOAD"]}'
    if 'GLIBC_TUNABLES' in os.environ:
        source = 'diffusion_jax' if os.environ['GLIBC_TUNABLES'] == TUNABLES else 'the user'
        return f'GLIBC_TUNABLES={os.environ["GLIBC_TUNABLES"]} (set by {source})'
    if not _is_glibc_linux():
        return 'the platform default (no glibc)'
    return 'glibc defaults'

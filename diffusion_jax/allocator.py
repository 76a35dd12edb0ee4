"""glibc malloc settings for the command-line entry points: keep XLA's per-step buffers mapped.

Why: on the CPU, XLA allocates each execution's temporaries with malloc, as one block per
execution (tens of MB for the main job's step, about 1 GiB per device for CIFAR-10's). Above
glibc's mmap threshold (at most 32 MB through mallopt) every such block is a fresh mmap, unmapped
again at free, so each step faults all its pages in again: the MNIST main job spent a fifth of its
CPU time in the kernel (10.4 M minor page faults and 23 s of system time in 300 training steps,
Intel Xeon with AMX, 2026-12-06). With one arena and mmap and trim thresholds above any block a
CPU program allocates (64 GiB; the tunables, unlike mallopt, take values past 32 MB) the blocks
come from the heap and are reused: 0.30 M faults, 1.5 s of system time, the same losses bit for
bit (docs/benchmarks.md). A 1 GiB threshold, the first setting, fixed MNIST but not CIFAR-10,
whose temporaries block is larger.

The cost (measured after, docs/benchmarks.md): one arena is one malloc lock for every thread,
and on a 2-vCPU Intel Xeon the harness ran the MNIST train step at 0.82-0.86x and its 16-image
sampler at 0.42x of glibc's defaults under these settings; `glibc.malloc.hugetlb=1` measured
faster than both there and is the candidate to replace them (issue 30).

glibc reads these tunables only at start-up, so `reexec_with_tunables()` restarts the Python
process once with GLIBC_TUNABLES set, before JAX is imported. A GLIBC_TUNABLES or LD_PRELOAD the
user set wins (and so does DIFFUSION_JAX_ALLOCATOR=default); elsewhere than Linux with glibc it
does nothing.
"""

import os
import platform
import sys

TUNABLES = ('glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold=68719476736:'
            'glibc.malloc.trim_threshold=68719476736')
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

"""The malloc the command-line entry points run with: one that keeps XLA's per-step blocks.

Why: on the CPU, XLA allocates each execution's temporaries with malloc, as one block per
execution and device (tens of MB for the main job's step, about 1 GiB per device for
CIFAR-10's). glibc serves blocks that large with a fresh mmap, unmapped again at free, so every
step faults all its pages in again and the kernel zeroes them: the MNIST main job spent a fifth
of its CPU time in the kernel (81.6 M minor page faults in 2,400 steps, AMD EPYC, 2026-12-06).
glibc's tunables cannot keep such a block in a per-thread arena (a per-thread heap holds at
most 64 MiB); only one arena for all threads can, and its one lock cost more than the faults on
an Intel Xeon (docs/benchmarks.md).

So, where the `tbb` wheel is installed (Linux x86_64: a dependency there), the entry points run
under oneTBB's scalable allocator (`libtbbmalloc_proxy` preloaded in place of malloc): per-thread
caches, and with TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD at 8 MiB every larger block is kept for
reuse instead of going back to the kernel. Measured on a 2-vCPU Intel Xeon (docs/benchmarks.md):
the main job's train step 1.05-1.3x as fast as under glibc's defaults, its faults 1,055 -> 6-27
per image, system time 1.8 -> 0.15-0.21 ms per image; sampling 2-11% slower. Elsewhere on
glibc, `glibc.malloc.hugetlb=1` (transparent huge pages for malloc's mappings: 33x fewer
faults, the train step 1.1-1.2x on the same machine); without glibc, nothing. On a machine with
an accelerator JAX would use (a GPU or TPU device file, unless JAX_PLATFORMS starts with cpu)
nothing is set either: the step's buffers live on the device there, and no other malloc has
been tested with libtpu or CUDA.

Settings are read when a process starts, so `reexec_with_allocator()` restarts the Python
process once with them, before JAX is imported. A GLIBC_TUNABLES or LD_PRELOAD the user set
wins, and so does DIFFUSION_JAX_ALLOCATOR=default (glibc's own malloc). For a process that cannot
restart itself (a Jupyter kernel), start it under the settings:

    python -m diffusion_jax.allocator jupyter lab
"""

import glob
import importlib.metadata
import os
import pathlib
import platform
import sys

TBB_LIBRARIES = ('libtbbmalloc.so.2', 'libtbbmalloc_proxy.so.2')  # The proxy needs the first.
# Blocks at least this large are cached without the periodic clean-up (oneTBB's smallest value).
TBB_HUGE_THRESHOLD = str(8 << 20)
GLIBC_FALLBACK = 'glibc.malloc.hugetlb=1'
OPT_OUT = 'DIFFUSION_JAX_ALLOCATOR'  # 'default': glibc's own malloc.
USER_CHOICES = ('LD_PRELOAD', 'GLIBC_TUNABLES')  # Either one set: the user chose a malloc.
# NVIDIA and AMD GPUs; TPUs (v2-v3 as accel, v4 and later through VFIO).
ACCELERATOR_DEVICE_FILES = ('/dev/nvidia[0-9]*', '/dev/kfd', '/dev/accel[0-9]*', '/dev/vfio/[0-9]*')


def _is_glibc_linux():
    return sys.platform.startswith('linux') and platform.libc_ver()[0] == 'glibc'


def _runs_on_the_cpu():
    """Whether JAX would run on the CPU here: JAX_PLATFORMS says so, or no accelerator is seen."""
    platforms = os.environ.get('JAX_PLATFORMS', '').strip()
    if platforms:
        return platforms.split(',')[0].strip() == 'cpu'
    return not any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICE_FILES)


def _tbbmalloc_paths():
    """The two tbbmalloc libraries of the installed `tbb` wheel, or None."""
    try:
        files = importlib.metadata.files('tbb') or ()
    except importlib.metadata.PackageNotFoundError:
        return None
    found = {f.name: pathlib.Path(f.locate()).resolve() for f in files if f.name in TBB_LIBRARIES}
    paths = [str(found[name]) for name in TBB_LIBRARIES if name in found and found[name].is_file()]
    # LD_PRELOAD separates its entries with spaces and colons.
    if len(paths) < len(TBB_LIBRARIES) or any(c in p for p in paths for c in ' :'):
        return None
    return paths


def settings():
    """The environment variables this module runs processes with ({} where it sets none)."""
    if not (_is_glibc_linux() and _runs_on_the_cpu()):
        return {}
    paths = _tbbmalloc_paths()
    if paths:
        return {'LD_PRELOAD': ':'.join(paths),
                'TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD': TBB_HUGE_THRESHOLD}
    return {'GLIBC_TUNABLES': GLIBC_FALLBACK}


def pending_settings():
    """`settings()`, or nothing where the user chose a malloc (their own, or glibc's)."""
    if any(key in os.environ for key in USER_CHOICES) or os.environ.get(OPT_OUT) == 'default':
        return {}
    return settings()


def without_allocator(environ):
    """`environ` without any malloc choice: a child started with it gets glibc's defaults."""
    drop = {*USER_CHOICES, *settings()}
    return {key: value for key, value in environ.items() if key not in drop}


def reexec_with_allocator():
    """Replaces this process by the same command under `settings()`, when needed.

    Call first thing in a `__main__` block. Returns (doing nothing) if the settings are in place
    already, the user set their own allocator settings, or there are none for this platform.
    """
    changes = pending_settings()
    argv = getattr(sys, 'orig_argv', None)
    if not changes or not argv:  # No argv: an embedded interpreter, no command to run again.
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], {**changes, **os.environ})


def describe():
    """What this process allocates with, for the log."""
    ours = settings()
    for key in USER_CHOICES:
        if key in os.environ:
            source = 'diffusion_jax' if os.environ[key] == ours.get(key) else 'the user'
            name = 'tbbmalloc, ' if 'tbbmalloc_proxy' in os.environ[key] else ''
            return f'{name}{key}={os.environ[key]} (set by {source})'
    if not _is_glibc_linux():
        return 'the platform default (no glibc)'
    if not _runs_on_the_cpu():
        return 'glibc defaults (an accelerator runs the program)'
    return 'glibc defaults'


def main(argv):
    """`python -m diffusion_jax.allocator COMMAND [ARGS...]`: runs COMMAND under the settings."""
    if len(argv) < 2:
        sys.exit(f'usage: python -m diffusion_jax.allocator COMMAND [ARGS...]\n'
                 f'allocator settings here: {settings() or "none"}')
    try:
        os.execvpe(argv[1], argv[1:], {**pending_settings(), **os.environ})
    except OSError as error:
        sys.exit(f'error: cannot run {argv[1]!r}: {error.strerror}')


if __name__ == '__main__':
    main(sys.argv)

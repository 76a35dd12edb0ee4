"""What the benchmark knows about the machine: other processes' load, memory, a matmul ceiling."""

import os
import platform
import re
import resource
import time

import numpy as np


def _busy_jiffies():
    """(busy, total) CPU jiffies of the whole machine, from /proc/stat."""
    with open('/proc/stat') as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


class LoadMonitor:
    """CPU cores kept busy by *other* processes while this one runs.

    Machine-wide busy time from /proc/stat minus this process's own CPU time (all threads), over
    wall time: the benchmark's own work does not count, anything else does.
    """

    def __init__(self):
        self._tick = os.sysconf('SC_CLK_TCK')
        self.reset()

    def reset(self):
        self._start = (time.monotonic(), _busy_jiffies()[0], self._own_seconds())

    @staticmethod
    def _own_seconds():
        times = os.times()
        return times.user + times.system + times.children_user + times.children_system

    def other_cores(self):
        """Average cores used by other processes since the last reset."""
        wall0, busy0, own0 = self._start
        wall = time.monotonic() - wall0
        busy = (_busy_jiffies()[0] - busy0) / self._tick
        own = self._own_seconds() - own0
        return max(0.0, busy - own) / max(wall, 1e-9)


def idle_load(seconds=3.0):
    """Cores used by other processes over `seconds` while this one sleeps."""
    monitor = LoadMonitor()
    time.sleep(seconds)
    return monitor.other_cores()


def peak_rss_mib():
    """Peak resident set size of this process so far, in MiB.

    Linux's VmHWM, not ru_maxrss: the kernel carries ru_maxrss across exec, so a child started by
    a large process would report its parent's peak (every case measured 10725 MiB that way).
    """
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB elsewhere


def _cpuinfo():
    try:
        with open('/proc/cpuinfo') as f:
            return f.read()
    except OSError:
        return None


def has_bf16_matmul():
    """Whether the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16). Without them
    PyTorch's bfloat16 autocast runs about 37x slower than float32 (a 35.7M U-Net forward,
    AMD EPYC AVX2), too slow to be the peer anyone would pick; with them our bfloat16
    convolutions run as matmuls (models/conv.py), the same test."""
    from diffusion_jax.models import conv
    return conv.cpu_has_bf16_matmul()


def cpu_description():
    info = _cpuinfo()
    if info is None:
        return platform.processor()
    model = re.search(r'model name\s*:\s*(.*)', info)
    from diffusion_jax.models import conv
    isa = [f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16') if f in conv.cpu_flags()]
    return f'{model.group(1) if model else "?"} ({os.cpu_count()} vCPU; {", ".join(isa)})'


def matmul_gflops(matmul, n=2048, repeats=5):
    """Best GFLOP/s of `matmul()` (one n x n x n fp32 product) over `repeats` timed calls."""
    matmul()  # Warm-up.
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        matmul()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def matmul_ceilings(n=2048, with_torch=True):
    """fp32 matmul GFLOP/s of the libraries in the run: the ceiling achieved FLOP/s is put against.

    Returns:
      {library: GFLOP/s}; torch uses all its threads, NumPy its BLAS, JAX the data-parallel mesh.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    mesh = jax.make_mesh((jax.device_count(),), ('data',))
    ja = jax.device_put(a, NamedSharding(mesh, P('data')))  # Rows split over the devices.
    jb = jax.device_put(b, NamedSharding(mesh, P()))
    jmatmul = jax.jit(jnp.matmul)
    ceilings = {'numpy': matmul_gflops(lambda: a @ b, n),
                'jax': matmul_gflops(lambda: jmatmul(ja, jb).block_until_ready(), n)}
    if with_torch:
        import torch
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        ceilings['torch'] = matmul_gflops(lambda: torch.mm(ta, tb), n)
    return ceilings

"""Multi-host set-up: joining the JAX cluster, host barriers and host copies of global arrays.

On a TPU pod every host runs the same command; `jax.distributed.initialize()` joins them (on
Cloud TPU VMs it finds the coordinator itself). Each process then reads its own rows of every
global batch (`InputPipeline`), and only process 0 writes metrics, images and logs.
"""

import glob
import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

MODES = ('auto', 'on', 'off')


def initialize(mode, *, coordinator_address=None, num_processes=None, process_id=None):
    """Joins the JAX cluster when `mode` asks for it; returns whether it did.

    Args:
      mode: 'on' always initializes; 'off' never (Colab, a single host); 'auto' initializes on a
        Cloud TPU VM (TPU chips attached) or when JAX_COORDINATOR_ADDRESS is set.
      coordinator_address, num_processes, process_id: for clusters JAX cannot detect (and the
        local multi-process tests); None lets `jax.distributed.initialize` find them.
    """
    if mode not in MODES:
        raise ValueError(f'Unknown --distributed={mode!r}; valid: {", ".join(MODES)}')
    if mode == 'auto':
        mode = ('on' if tpu_chips_attached() or coordinator_address
                or os.environ.get('JAX_COORDINATOR_ADDRESS') else 'off')
    if mode == 'off':
        return False
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    logging.info('Joined the JAX cluster as process %d of %d', jax.process_index(),
                 jax.process_count())
    return True


def tpu_chips_attached():
    """Whether this machine has TPU chips (on the PCI bus, as JAX's own TPU set-up looks).

    Not whether libtpu is installed: it is also installed where TPU programs are only compiled
    (`diffusion_jax.aot` on a CPU machine), which must not start a cluster.
    """
    try:
        from jax._src import hardware_utils
        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except (ImportError, AttributeError, OSError):  # A JAX without it: look for the devices.
        return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def barrier(name):
    """Waits until every process gets here (a no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def process_zero_first(fn, name):
    """fn() on process 0, then on the others: e.g. preparing a dataset into a shared directory
    once, instead of every host writing the same files at the same time."""
    result = fn() if jax.process_index() == 0 else None
    barrier(name)
    return result if jax.process_index() == 0 else fn()


def to_host(x):
    """A NumPy copy of a global array, also when its shards live on several hosts."""
    if getattr(x, 'is_fully_addressable', True):
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

"""Entry point: parse flags, log the topology, hand over to the mode's function.

    python -m diffusion_jax.main --config=configs/mnist.py --workdir=runs/mnist
    python -m diffusion_jax.main --config=configs/mnist.py --workdir=runs/mnist \
        --config.training.batch_size=32
"""

import os

import jax
from absl import app
from absl import flags
from absl import logging

from diffusion_jax import config_cli
from diffusion_jax import distributed
from diffusion_jax import edit
from diffusion_jax import evaluate
from diffusion_jax import export
from diffusion_jax import toy
from diffusion_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval', 'edit', 'export'],
                  'train: train (resuming if possible), then sample; sample: samples from the '
                  "workdir's EMA weights; eval: test bits/dim and rate-distortion (a "
                  'noisy_classifier run: its accuracy by t); edit: SDEdit of edit.guide images '
                  '(or the stroke demo); export: the EMA weights as a diffusers DDPMPipeline '
                  'folder, WORKDIR/diffusers.')
flags.DEFINE_integer(
    'cpu_devices', -1,
    'XLA CPU devices (used only when running on the CPU): -1 picks one per core, reduced to a '
    'divisor of the batch sizes; 0 leaves the XLA default (one multi-threaded device).')
flags.DEFINE_bool('cpu_fast_math', True, 'XLA CPU fast math (NaN and Inf are still honoured).')
flags.DEFINE_enum('distributed', 'auto', list(distributed.MODES),
                  'Join a multi-host JAX cluster with jax.distributed.initialize(): on (a TPU pod; '
                  'every host runs the same command), off (Colab, one host), auto (on when libtpu '
                  'is installed or a coordinator address is given).')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0, for clusters JAX does not detect by itself.')
flags.DEFINE_integer('num_processes', None, 'Processes in the cluster (with coordinator_address).')
flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes).')


# XLA's CPU scheduler that orders work for concurrency keeps many more buffers alive and, in the
# CIFAR-10 train step, re-did the slicing of the convolution gradients: turning it off took the
# step from 2.0 to 3.3 images/s and its temporaries from 2.8 to 1.0 GiB per device
# (docs/benchmarks.md). On one multi-threaded device it made no difference (MNIST step).
SEQUENTIAL_SCHEDULER_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler=false'


def configure_cpu_backend(config, cpu_devices, fast_math):
    """One single-threaded XLA device per core, data-parallel over the cores, scheduled in order.

    On 2 cores this trains the main job 1.6x and samples ~2x faster than one device with a
    2-thread pool: its small convolutions do not split well across threads, whole batch halves do.
    Must run before JAX initializes a backend; it does not touch TPU or GPU backends. Flags
    already in XLA_FLAGS win.
    """
    xla_flags = os.environ.get('XLA_FLAGS', '')
    if fast_math:
        xla_flags += ' --xla_cpu_enable_fast_math=true'
    if 'xla_cpu_enable_concurrency_optimized_scheduler' not in xla_flags:
        xla_flags += ' ' + SEQUENTIAL_SCHEDULER_FLAG
    user_set = ('xla_force_host_platform_device_count' in xla_flags
                or 'JAX_NUM_CPU_DEVICES' in os.environ)
    if cpu_devices != 0 and not user_set:
        if cpu_devices < 0:
            batch_sizes = (config.training.batch_size, config.sampling.batch_size,
                           config.eval.batch_size)
            cpu_devices = available_cores()
            while any(b % cpu_devices for b in batch_sizes):
                cpu_devices -= 1
        if cpu_devices > 1:
            xla_flags += ' --xla_cpu_multi_thread_eigen=false'
            jax.config.update('jax_num_cpu_devices', cpu_devices)
    os.environ['XLA_FLAGS'] = xla_flags.strip()


def available_cores():
    """Cores this process may run on (all cores where the OS cannot say, e.g. macOS)."""
    if hasattr(os, 'sched_getaffinity'):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    config_cli.setup_logging()
    configure_cpu_backend(FLAGS.config, FLAGS.cpu_devices, FLAGS.cpu_fast_math)
    distributed.initialize(FLAGS.distributed, coordinator_address=FLAGS.coordinator_address,
                           num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    logging.info('JAX process %d of %d, local devices %s', jax.process_index(),
                 jax.process_count(), jax.local_devices())
    if FLAGS.config.data.name == toy.DATA_NAME:
        if FLAGS.mode != 'train':
            raise app.UsageError(f'data.name={toy.DATA_NAME!r} (the 2-D check) has only '
                                 '--mode=train: it trains, samples and evaluates in one go')
        toy.run(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == 'train':
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode in ('sample', 'edit') and FLAGS.config.task != 'diffusion':
        raise app.UsageError(f'--mode={FLAGS.mode} needs a task=diffusion run, not '
                             f'task={FLAGS.config.task!r}')
    elif FLAGS.mode == 'sample':
        evaluate.sample(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == 'edit':
        edit.edit(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == 'export':
        export.export(FLAGS.config, FLAGS.workdir)
    else:
        evaluate.evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
    config_cli.run(main)

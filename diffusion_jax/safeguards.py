"""What keeps a long run safe without babysitting: the NaN policy and preemption.

NaN policy (`training.nan_policy`):
  fail: stop with a message naming the step and the first non-finite metric;
  skip: the train step drops a non-finite update (`train_step.train_step(skip_nonfinite=True)`
    keeps the parameters, EMA and optimizer state, and reports `skipped`); the loop counts and
    logs skips and stops when more than `training.max_consecutive_skips` come in a row.
Either way a non-finite state is never saved (`checkpointing.save` refuses it).

Preemption: on a pod, `jax.distributed`'s preemption service turns SIGTERM on any host into a
step at which every host agrees to save (orbax's `reached_preemption`). A single process has no
such service, so a SIGTERM handler raises the flag instead.
"""

import logging
import signal
import threading

import jax
import numpy as np

from diffusion_jax import errors

NAN_POLICIES = ('fail', 'skip')


class NanGuard:
    """Host-side bookkeeping of non-finite steps, fed with the step metrics as they arrive."""

    def __init__(self, policy, max_consecutive_skips):
        if policy not in NAN_POLICIES:
            raise errors.ConfigError(f'Unknown training.nan_policy {policy!r}; valid: '
                                     f'{", ".join(NAN_POLICIES)}')
        self.policy = policy
        self.max_consecutive = max_consecutive_skips
        self.total_skips = 0
        self.consecutive = 0

    def check(self, step_metrics, first_step):
        """Checks consecutive steps' host metrics; returns the means over the kept steps.

        Args:
          step_metrics: NumPy metric dicts of consecutive steps.
          first_step: the step count before the first of them.

        Raises:
          FloatingPointError: (fail) a metric is not finite, naming the step and the metric;
            (skip) more than `max_consecutive_skips` updates in a row were dropped.
        """
        kept = []
        for offset, metrics in enumerate(step_metrics):
            step = first_step + offset + 1
            if self.policy == 'skip' and metrics.get('skipped', 0):
                self.total_skips += 1
                self.consecutive += 1
                logging.warning('step %d: non-finite loss or gradient, update skipped (%d in a '
                                'row, %d in total)', step, self.consecutive, self.total_skips)
                if self.consecutive > self.max_consecutive:
                    raise FloatingPointError(
                        f'{self.consecutive} consecutive non-finite steps (up to step {step}), '
                        f'more than training.max_consecutive_skips={self.max_consecutive}; the '
                        'last checkpoint is intact')
                continue
            self.consecutive = 0
            for name in sorted(metrics, key=lambda n: (n != 'loss', n)):  # The loss first.
                value = metrics[name]
                if not np.all(np.isfinite(value)):
                    raise FloatingPointError(
                        f'non-finite {name} ({value}) at step {step}; the state was not '
                        'saved, the last checkpoint is intact (training.nan_policy=skip drops '
                        'such updates instead)')
            kept.append(metrics)
        means = ({k: float(np.mean([m[k] for m in kept])) for k in kept[0]} if kept
                 else {})
        if self.policy == 'skip':
            means['nan_skips'] = float(self.total_skips)
        return means


class PreemptionWatch:
    """`reached(step, manager)` is True at the step where every process should save and stop.

    Use as a context manager: the single-process SIGTERM handler is installed on entry and the
    previous handler restored on exit (so a SIGTERM after training ends the process as usual).
    """

    def __init__(self):
        self._signalled = threading.Event()
        self._previous = None

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum, frame):
        logging.warning('SIGTERM: saving a checkpoint after this step, then exiting')
        self._signalled.set()

    def reached(self, step, manager):
        if jax.process_count() > 1:
            return manager.reached_preemption(step)
        return self._signalled.is_set()

"""Metrics to TensorBoard (tensorboardX), metrics.jsonl and the log, by process 0 only."""

import json
import logging
import os
import sys

import jax
import numpy as np


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported here (only process 0 writes) and without torch.

    tensorboardX imports torch whenever it is installed, only to accept torch tensors (which we
    never pass): about 2 s at every start of a run. Its import falls back cleanly without torch.
    """
    if 'torch' in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules['torch'] = None  # `import torch` now raises ImportError.
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules['torch']
    return SummaryWriter


class MetricWriter:
    """Scalars and images to TensorBoard event files in `logdir`, plus the Python log.

    Scalars also go to `logdir/metrics.jsonl` (one JSON object per write) for plots and tests.
    With `resume_step`, rows after that step (written by a run that crashed before its next
    checkpoint, and about to be recomputed) are dropped, so the file stays one curve.
    """

    def __init__(self, logdir, *, resume_step=None):
        self._writer = None
        self.jsonl_path = os.path.join(logdir, 'metrics.jsonl')
        if jax.process_index() == 0:
            if resume_step is not None and os.path.exists(self.jsonl_path):
                rows = [r for r in read_metrics(self.jsonl_path) if r['step'] <= resume_step]
                with open(self.jsonl_path, 'w') as f:
                    f.writelines(json.dumps(r) + '\n' for r in rows)
            self._writer = _summary_writer_class()(logdir)

    def write_scalars(self, step, scalars):
        scalars = {k: float(v) for k, v in scalars.items()}
        if self._writer is None:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)
        with open(self.jsonl_path, 'a') as f:
            f.write(json.dumps(dict(step=step, **scalars)) + '\n')
        logging.info('step %d: %s', step,
                     ', '.join(f'{k}={v:.6g}' for k, v in sorted(scalars.items())))

    def write_image(self, step, name, image):
        """`image`: uint8 [H, W, C]."""
        if self._writer is not None:
            self._writer.add_image(name, np.asarray(image), step, dataformats='HWC')

    def flush(self):
        if self._writer is not None:
            self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()


def read_metrics(path):
    """The rows of a metrics.jsonl file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(jsonl_path, png_path):
    """Writes the training loss against the step as a PNG (process 0 only)."""
    if jax.process_index() != 0 or not os.path.exists(jsonl_path):
        return
    import matplotlib
    matplotlib.use('Agg')  # No display on TPU VMs and CI.
    import matplotlib.pyplot as plt
    rows = [r for r in read_metrics(jsonl_path) if 'loss' in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r['step'] for r in rows], [r['loss'] for r in rows])
    ax.set(xlabel='step', ylabel='training loss', yscale='log')
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)

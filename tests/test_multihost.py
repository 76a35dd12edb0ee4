"""Multi-host training on one machine: 2 processes (2 CPU devices each) joined with
`--distributed=on` over CPU collectives train; a SIGTERM to one of them makes both save at the
same step (JAX's preemption sync) and exit 0; they restore and continue; the checkpoint then
restores in a single process, which continues with the same losses."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, python_env
from diffusion_jax import reporting

pytestmark = pytest.mark.slow


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def train_command(workdir, data_dir, num_steps):
    return [sys.executable, '-m', 'diffusion_jax.main', '--config=configs/tiny.py',
            f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
            '--config.training.log_every=1', '--config.training.checkpoint_every=2',
            f'--config.training.num_train_steps={num_steps}',
            '--config.sampling.num_samples=16']


def run_cluster(workdir, data_dir, num_steps, num_processes=2, sigterm_after=None):
    """Runs the training command as `num_processes` processes of one JAX cluster; with
    `sigterm_after`, the last process gets a SIGTERM once that many steps are logged."""
    port = free_port()
    processes = [subprocess.Popen(
        train_command(workdir, data_dir, num_steps) + [
            '--distributed=on', f'--coordinator_address=127.0.0.1:{port}',
            f'--num_processes={num_processes}', f'--process_id={i}'],
        cwd=ROOT, env=python_env(num_devices=2, fast_compiles=True),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in range(num_processes)]
    if sigterm_after:
        metrics = os.path.join(workdir, 'metrics.jsonl')
        while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= sigterm_after):
            assert all(p.poll() is None for p in processes), 'a process ended early'
            time.sleep(0.01)
        processes[-1].send_signal(signal.SIGTERM)
    logs = [p.communicate(timeout=900)[1] for p in processes]
    for i, (p, log) in enumerate(zip(processes, logs)):
        assert p.returncode == 0, f'process {i}:\n{log[-4000:]}'
    return logs


def run_single(workdir, data_dir, num_steps):
    result = subprocess.run(train_command(workdir, data_dir, num_steps), cwd=ROOT,
                            env=python_env(num_devices=4, fast_compiles=True),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


def losses(workdir):
    return {r['step']: r['loss'] for r in reporting.read_metrics(
        os.path.join(workdir, 'metrics.jsonl'))}


def test_two_processes_train_save_restore_and_a_single_process_restores(tmp_path, data_dir):
    cluster = str(tmp_path / 'cluster')
    logs = run_cluster(cluster, data_dir, num_steps=1000, sigterm_after=4)
    assert 'JAX process 0 of 2' in logs[0] and 'JAX process 1 of 2' in logs[1]
    assert 'local devices [CpuDevice(id=0), CpuDevice(id=1)]' in logs[0]
    # Process 1 got the signal; both saved the same step and exited 0.
    steps = {int(m.group(1)) for log in logs
             for m in re.finditer(r'Preempted: saved step (\d+)', log)}
    assert len(steps) == 1, logs[0][-3000:]
    step = steps.pop()
    assert 4 <= step < 1000
    assert sorted(losses(cluster)) == list(range(1, step + 1))  # Only process 0 writes them.
    snapshot = str(tmp_path / 'snapshot')
    shutil.copytree(cluster, snapshot)
    # The cluster restores its own checkpoint, continues, and samples (gathered to process 0).
    logs = run_cluster(cluster, data_dir, num_steps=step + 2)
    assert all(f'Restored checkpoint at step {step}' in log for log in logs)
    assert sorted(losses(cluster)) == list(range(1, step + 3))
    with np.load(os.path.join(cluster, 'samples.npz')) as f:
        assert f['images'].shape == (16, 8, 8, 1)
    # One process, the same 4 devices in total: restoring verifies every array's fingerprint
    # (written by the cluster), and the continuation matches the cluster's last two steps.
    log = run_single(snapshot, data_dir, num_steps=step + 2)
    assert f'Restored checkpoint at step {step}' in log and 'fingerprint' not in log
    last_two = (step + 1, step + 2)
    np.testing.assert_allclose([losses(snapshot)[s] for s in last_two],
                               [losses(cluster)[s] for s in last_two], rtol=1e-5)

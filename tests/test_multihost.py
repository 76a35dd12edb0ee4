"""Multi-host training on one machine: 2 processes (2 CPU devices each) joined with
`--distributed=on` over CPU collectives train, save with orbax, restore and continue; the
checkpoint then restores in a single process, and both agree with single-process training."""

import os
import shutil
import socket
import subprocess
import sys

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


def run_cluster(workdir, data_dir, num_steps, num_processes=2):
    """Runs the training command as `num_processes` processes of one JAX cluster."""
    port = free_port()
    processes = [subprocess.Popen(
        train_command(workdir, data_dir, num_steps) + [
            '--distributed=on', f'--coordinator_address=127.0.0.1:{port}',
            f'--num_processes={num_processes}', f'--process_id={i}'],
        cwd=ROOT, env=python_env(num_devices=2, fast_compiles=True),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in range(num_processes)]
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
    logs = run_cluster(cluster, data_dir, num_steps=4)
    assert 'JAX process 0 of 2' in logs[0] and 'JAX process 1 of 2' in logs[1]
    assert 'local devices [CpuDevice(id=0), CpuDevice(id=1)]' in logs[0]
    snapshot = str(tmp_path / 'at_step_4')
    shutil.copytree(cluster, snapshot)
    # Only process 0 writes metrics, samples and images.
    assert sorted(losses(cluster)) == [1, 2, 3, 4]
    with np.load(os.path.join(cluster, 'samples.npz')) as f:
        assert f['images'].shape == (16, 8, 8, 1)
    # The cluster restores its own checkpoint and continues.
    logs = run_cluster(cluster, data_dir, num_steps=6)
    assert all('Restored checkpoint at step 4' in log for log in logs)
    assert sorted(losses(cluster)) == [1, 2, 3, 4, 5, 6]
    # One process, the same 4 devices in total: restoring verifies every array's fingerprint
    # (written by the cluster), and the continuation matches the cluster's steps 5 and 6.
    log = run_single(snapshot, data_dir, num_steps=6)
    assert 'Restored checkpoint at step 4' in log and 'fingerprint' not in log
    cluster_losses, single_losses = losses(cluster), losses(snapshot)
    np.testing.assert_allclose([single_losses[s] for s in (5, 6)],
                               [cluster_losses[s] for s in (5, 6)], rtol=1e-5)

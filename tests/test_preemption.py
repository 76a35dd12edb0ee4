"""Preemption and crashes on a real training process: SIGTERM saves and exits 0, `kill -9` in
the middle of an async checkpoint save loses only the steps since the last committed one, and
either way the rerun's loss curve equals an uninterrupted run's exactly."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY_RUN_STEPS as NUM_STEPS, python_env, tiny_run_command
from diffusion_jax import reporting

pytestmark = pytest.mark.slow


def command(workdir, data_dir, *overrides):
    """The shared trained run's command (conftest.trained_tiny), without the sampling."""
    return [sys.executable, *tiny_run_command(workdir, data_dir,
                                              '--config.sampling.num_samples=0', *overrides)]


def start(workdir, data_dir, *overrides):
    return subprocess.Popen(command(workdir, data_dir, *overrides), cwd=ROOT,
                            env=python_env(fast_compiles=True), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def finish(process, timeout=600):
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


def curve(workdir):
    """(loss, grad_norm) by step; the writer keeps one row per step across restarts."""
    rows = reporting.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
    steps = [r['step'] for r in rows]
    assert len(steps) == len(set(steps)), steps
    return {r['step']: (r['loss'], r['grad_norm']) for r in rows}


def committed_steps(workdir):
    directory = os.path.join(workdir, 'checkpoints')
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def wait_for(predicate, process, timeout=600):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, finish(process)[1][-3000:]
        assert time.monotonic() < deadline, 'timed out'
        time.sleep(0.001)


def logged_steps(workdir):
    path = os.path.join(workdir, 'metrics.jsonl')
    return len(reporting.read_metrics(path)) if os.path.exists(path) else 0


@pytest.fixture
def uninterrupted(trained_tiny):
    """The loss curve of the uninterrupted run: the suite's shared one, made by the same command
    (plus its sample grids and final samples, which do not touch the training state)."""
    losses = curve(trained_tiny)
    assert sorted(losses) == list(range(1, NUM_STEPS + 1))
    return losses


def test_sigterm_saves_at_the_next_step_exits_0_and_the_rerun_continues(tmp_path, data_dir,
                                                                        uninterrupted):
    workdir = str(tmp_path)
    overrides = ('--config.training.checkpoint_every=1000',)  # Only the preemption save.
    process = start(workdir, data_dir, *overrides)
    wait_for(lambda: logged_steps(workdir) >= 5, process)
    process.send_signal(signal.SIGTERM)
    returncode, stderr = finish(process)
    assert returncode == 0, stderr[-3000:]
    saved = re.search(r'Preempted: saved step (\d+)', stderr)
    assert saved, stderr[-3000:]
    step = int(saved.group(1))
    assert 5 <= step < NUM_STEPS and committed_steps(workdir)[-1] == step
    returncode, stderr = finish(start(workdir, data_dir, *overrides))
    assert returncode == 0, stderr[-3000:]
    assert f'Restored checkpoint at step {step}' in stderr
    assert curve(workdir) == uninterrupted  # Exact floats: data order and RNG included.


def test_kill_9_during_an_async_save_loses_only_uncommitted_steps(tmp_path, data_dir,
                                                                  uninterrupted):
    for attempt in range(3):  # A save can commit between seeing it and the kill: try again.
        workdir = str(tmp_path / str(attempt))
        checkpoints = os.path.join(workdir, 'checkpoints')

        def saving():  # Orbax writes a step into a temporary directory, then renames it.
            return (logged_steps(workdir) >= 6 and os.path.isdir(checkpoints)
                    and any('tmp' in d for d in os.listdir(checkpoints)))
        process = start(workdir, data_dir, '--config.training.checkpoint_every=1')
        wait_for(saving, process)
        process.kill()
        process.wait()
        if [d for d in os.listdir(checkpoints) if 'tmp' in d]:
            break  # The kill landed in the middle of a save.
    else:
        pytest.fail('three kills all missed the saves')
    last_committed = committed_steps(workdir)[-1]
    assert last_committed < NUM_STEPS
    returncode, stderr = finish(start(workdir, data_dir, '--config.training.checkpoint_every=1'))
    assert returncode == 0, stderr[-3000:]
    assert f'Restored checkpoint at step {last_committed}' in stderr
    assert not [d for d in os.listdir(checkpoints) if 'tmp' in d]  # Cleaned up on start.
    assert curve(workdir) == uninterrupted

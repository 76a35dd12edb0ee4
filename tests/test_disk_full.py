"""A full disk during a checkpoint save: one `error:` line naming the step, the path and the last
good checkpoint, exit status 2, the half-written step removed, the earlier checkpoints intact,
and the same command resumes once there is space. The disk is made full by a checkpoint writer
that fails with ENOSPC from a given step on (no root, no small filesystem needed)."""

import json
import os
import textwrap

from conftest import TINY_RUN_STEPS, file_digests, run_python, tiny_run_command

FAIL_FROM_STEP = TINY_RUN_STEPS + 4
# Runs the main entry point with orbax's JSON writer failing as a full disk does.
FULL_DISK_MAIN = textwrap.dedent(f'''
    import errno, os, re, sys
    import orbax.checkpoint as ocp
    from diffusion_jax import config_cli, main

    original = ocp.JsonCheckpointHandler._save_fn

    def save_fn(self, x, directory):
        step = int(re.match(r'(\\d+)', directory.parent.name).group(1))
        if step >= {FAIL_FROM_STEP}:
            raise OSError(errno.ENOSPC, 'No space left on device', str(directory))
        return original(self, x, directory)

    ocp.JsonCheckpointHandler._save_fn = save_fn
    sys.argv = ['diffusion_jax.main'] + sys.argv[1:]
    config_cli.run(main.main)
''')


def test_a_full_disk_stops_with_one_line_and_the_run_resumes(copy_of_trained_tiny, data_dir):
    workdir = copy_of_trained_tiny
    checkpoints = workdir / 'checkpoints'
    before = {step: file_digests(checkpoints / step) for step in os.listdir(checkpoints)}
    more = TINY_RUN_STEPS + 8
    command = tiny_run_command(workdir, data_dir, f'--config.training.num_train_steps={more}',
                               '--config.training.checkpoint_every=2',
                               '--config.training.keep_checkpoints=100')
    assert command[:2] == ['-m', 'diffusion_jax.main']
    result = run_python(['-c', FULL_DISK_MAIN, *command[2:]], check=False, fast_compiles=True)
    last_good = FAIL_FROM_STEP - 2
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert lines[-1].startswith('error: no space left on device while saving the checkpoint of '
                                f'step {FAIL_FROM_STEP} to {checkpoints}'), lines[-1]
    assert f'the last good checkpoint is step {last_good}' in lines[-1]
    assert 'Traceback' not in result.stderr.split('Compiling')[-1], result.stderr[-3000:]
    # The earlier steps are byte for byte as they were.
    committed = sorted(int(name) for name in os.listdir(checkpoints) if name.isdigit())
    assert committed[-1] == last_good
    for step, files in before.items():
        assert file_digests(checkpoints / step) == files
    # Space again: the same command removes the half-written step, resumes from the last good
    # one and finishes.
    resumed = run_python(command, fast_compiles=True)
    assert f'Restored checkpoint at step {last_good}' in resumed.stderr
    assert not [name for name in os.listdir(checkpoints) if 'tmp' in name]
    rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().split('\n')
            if line.strip()]
    assert max(row['step'] for row in rows) == more

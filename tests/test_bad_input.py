"""Bad input fails with a message naming the problem, and nothing already saved is lost: each
case runs against the workdir of a trained run (a copy of the suite's shared one, for this
module), whose files must be byte-for-byte unchanged, and asks for more steps than it holds,
so anything that got past the check would resume and write."""

import json
import shutil

import numpy as np
import pytest

from conftest import TINY_RUN_STEPS, file_digests, run_python
from configs import tiny
from diffusion_jax import checkpointing, train

pytestmark = pytest.mark.usefixtures('fast_compiles')


MORE_STEPS = TINY_RUN_STEPS + 2


def tiny_config(data_dir):
    config = tiny.get_config()
    config.data.data_dir = data_dir
    config.sampling.num_samples = 0
    config.training.num_train_steps = MORE_STEPS
    config.training.checkpoint_every = 1
    return config


@pytest.fixture(scope='module')
def trained(tmp_path_factory, trained_tiny):
    workdir = tmp_path_factory.mktemp('bad_input') / 'trained'
    shutil.copytree(trained_tiny, workdir)
    return str(workdir)


def cifar10_without_archive(c, tmp_path):
    c.data.update(name='cifar10', image_size=32, channels=3, manual_dir=str(tmp_path))
    c.model.out_ch = 3


CASES = {
    'channels': (lambda c, _: c.update_from_flattened_dict(
        {'data.channels': 3, 'model.out_ch': 3}),
        ValueError, r'dataset images have shape \(8, 8, 1\).*config expects \(8, 8, 3\)'),
    'image_size': (lambda c, _: setattr(c.data, 'image_size', 16),
                   ValueError, r'dataset images have shape \(8, 8, 1\).*\(16, 16, 1\)'),
    'other_model': (lambda c, _: setattr(c.model, 'ch', 16), checkpointing.CheckpointError,
                    r'another model config.*params/conv_in/kernel: checkpoint \(3, 3, 1, 8\), '
                    r'model \(3, 3, 1, 16\)'),
    'sampler': (lambda c, _: setattr(c.sampling, 'sampler', 'nope'), ValueError,
                r"Unknown sampling.sampler 'nope'; valid: ancestral, ddim"),
    'schedule': (lambda c, _: setattr(c.diffusion, 'beta_schedule', 'nope'), ValueError,
                 r"nope.*linear.*cosine"),
    'nan_policy': (lambda c, _: setattr(c.training, 'nan_policy', 'ignore'), ValueError,
                   'valid: fail, skip'),
    'microbatches': (lambda c, _: setattr(c.training, 'num_microbatches', 3), ValueError,
                     r'training.num_microbatches=3 does not divide the \d+ images per device'),
    'archive': (cifar10_without_archive, FileNotFoundError, r'cifar-10-binary.tar.gz'),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_bad_config_names_the_problem_and_keeps_the_run(trained, data_dir, tmp_path, case):
    change, error, message = CASES[case]
    before = file_digests(trained)
    config = tiny_config(data_dir)
    change(config, tmp_path)
    with pytest.raises(error, match=message):
        train.train_and_evaluate(config, trained)
    assert file_digests(trained) == before


def write_files(directory):
    """Guides that are each wrong in one way."""
    np.savez(directory / 'wrong_key.npz', pictures=np.zeros((2, 8, 8, 1), np.uint8))
    np.savez(directory / 'wrong_shape.npz', images=np.zeros((2, 9, 9, 1), np.uint8))
    (directory / 'not_an_image.png').write_text('plain text')


CLI_CASES = {
    'batch_not_divisible': (['--config.training.batch_size=15'], 2,
                            'global batch size 15 is not divisible by the 2 devices'),
    'unknown_key': (['--config.training.nope=1'], 1, "unknown config key 'training.nope'"),
    'wrong_type': (['--config.training.num_train_steps=many'], 1, 'invalid literal for int()'),
    'other_model': (['--config.model.ch=16'], 1, 'another model config'),
    'channels': (['--config.data.channels=3', '--config.model.out_ch=3'], 1,
                 'config expects (8, 8, 3)'),
    'image_size': (['--config.data.image_size=16'], 1, 'config expects (16, 16, 1)'),
    'schedule': (['--config.diffusion.beta_schedule=nope'], 1, "Unknown beta schedule 'nope'"),
    'nan_policy': (['--config.training.nan_policy=ignore'], 1, 'valid: fail, skip'),
    'microbatches': (['--config.training.num_microbatches=3'], 1,
                     'training.num_microbatches=3 does not divide'),
    'unknown_sampler': (['--config.sampling.sampler=nope'], 1, "Unknown sampling.sampler 'nope'"),
    'missing_archive': (['--config.data.name=cifar10', '--config.data.image_size=32',
                         '--config.data.channels=3', '--config.model.out_ch=3',
                         '--config.data.manual_dir={tmp}'], 1, 'cifar-10-binary.tar.gz'),
    'missing_folder': (['--config.data.name=folder', '--config.data.folder={tmp}/nowhere'], 1,
                       'is not a directory'),
    'guide_missing': (['--mode=edit', '--config.edit.guide={tmp}/nowhere.png'], 1,
                      'nowhere.png: no such file'),
    'guide_not_an_image': (['--mode=edit', '--config.edit.guide={tmp}/not_an_image.png'], 1,
                           'is not a readable PNG image'),
    'guide_wrong_key': (['--mode=edit', '--config.edit.guide={tmp}/wrong_key.npz'], 1,
                        "has no `images` array (it has ['pictures'])"),
    'guide_wrong_shape': (['--mode=edit', '--config.edit.guide={tmp}/wrong_shape.npz'], 1,
                          'expected images of shape [N, 8, 8, 1]'),
}
TRACEBACK_CASE = 'traceback_variable'


@pytest.fixture(scope='module')
def command_lines(trained, data_dir, tmp_path_factory):
    """Every CLI case against the trained workdir, and one with DIFFUSION_JAX_TRACEBACK=1: one
    interpreter forks a child per command line (tests/cli_driver.py; one full start-up each
    would cost the suite three minutes). {case: (exit status, output, the workdir's file digests
    after)}, and its digests before."""
    scratch = tmp_path_factory.mktemp('command_lines')
    write_files(scratch)
    common = ['--config=configs/tiny.py', f'--workdir={trained}',
              f'--config.data.data_dir={data_dir}',
              f'--config.training.num_train_steps={MORE_STEPS}']
    cases = {name: {'argv': common + [a.format(tmp=scratch) for a in args],
                    'num_devices': devices}
             for name, (args, devices, _) in CLI_CASES.items()}
    cases[TRACEBACK_CASE] = {'argv': common + ['--config.sampling.sampler=nope'],
                             'env': {'DIFFUSION_JAX_TRACEBACK': '1'}}
    (scratch / 'cases.json').write_text(json.dumps({'cases': cases, 'watch': str(trained)}))
    before = file_digests(trained)
    run_python(['tests/cli_driver.py', str(scratch / 'cases.json'), str(scratch)], timeout=600)
    results = json.loads((scratch / 'results.json').read_text())
    return before, {name: (r['status'], (scratch / f'{name}.out').read_text(), r['files'])
                    for name, r in results.items()}


@pytest.mark.parametrize('case', sorted(CLI_CASES))
def test_bad_command_line_gives_one_error_line_and_keeps_the_run(command_lines, case):
    """Status 2, the last output line `error: ...` holding the message, no traceback, and the
    trained workdir byte for byte as it was."""
    before, results = command_lines
    status, output, after = results[case]
    lines = output.strip().splitlines()
    assert status == 2, output[-3000:]
    assert lines[-1].startswith('error: ') and CLI_CASES[case][2] in lines[-1], output[-3000:]
    assert 'Traceback' not in output, output[-3000:]
    assert after == before


def test_the_traceback_variable_shows_a_user_errors_traceback(command_lines):
    before, results = command_lines
    status, output, after = results[TRACEBACK_CASE]
    assert status == 1 and 'Traceback' in output
    assert "ConfigError: Unknown sampling.sampler 'nope'" in output
    assert after == before


def test_the_driver_runs_a_command_line_as_python_does(command_lines, trained, data_dir):
    """tests/cli_driver.py is a faithful stand-in: one case through a real `python -m` gives
    the same status and the same error line."""
    args, devices, _ = CLI_CASES['batch_not_divisible']
    result = run_python(['-m', 'diffusion_jax.main', '--config=configs/tiny.py',
                         f'--workdir={trained}', f'--config.data.data_dir={data_dir}',
                         f'--config.training.num_train_steps={MORE_STEPS}', *args],
                        num_devices=devices, check=False, timeout=300)
    status, output, _ = command_lines[1]['batch_not_divisible']
    assert result.returncode == status == 2
    assert result.stderr.strip().splitlines()[-1] == output.strip().splitlines()[-1]

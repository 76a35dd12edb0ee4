"""Bad input fails with a message naming the problem, and nothing already saved is lost: each
case runs against the workdir of a trained run (a copy of the suite's shared one, for this
module), whose files must be byte-for-byte unchanged, and asks for more steps than it holds,
so anything that got past the check would resume and write."""

import hashlib
import os
import shutil

import pytest

from conftest import TINY_RUN_STEPS, run_python
from configs import tiny
from diffusion_jax import checkpointing, train

pytestmark = pytest.mark.usefixtures('fast_compiles')


def files_of(workdir):
    """{relative path: sha256} of every file under workdir."""
    result = {}
    for root, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(root, name)
            with open(path, 'rb') as f:
                result[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
    return result


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
    before = files_of(trained)
    config = tiny_config(data_dir)
    change(config, tmp_path)
    with pytest.raises(error, match=message):
        train.train_and_evaluate(config, trained)
    assert files_of(trained) == before


@pytest.mark.parametrize('args,devices,message', [
    (['--config.training.batch_size=15'], 2,
     'global batch size 15 is not divisible by the 2 devices'),
    (['--config.training.nope=1'], 1, "unknown config key 'training.nope'"),
    (['--config.training.num_train_steps=many'], 1, 'invalid literal for int()'),
])
def test_bad_command_line_names_the_problem_and_keeps_the_run(trained, data_dir, args,
                                                              devices, message):
    before = files_of(trained)
    result = run_python(['-m', 'diffusion_jax.main', '--config=configs/tiny.py',
                         f'--workdir={trained}', f'--config.data.data_dir={data_dir}',
                         f'--config.training.num_train_steps={MORE_STEPS}', *args],
                        num_devices=devices, check=False, timeout=300)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-3000:]
    assert files_of(trained) == before

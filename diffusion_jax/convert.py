"""Converts released diffusers DDPM weights into a workdir that --mode=sample/eval/train accept.

    python -m diffusion_jax.convert --config=configs/cifar10.py \
        --diffusers=/path/to/ddpm-cifar10-32 --workdir=runs/ddpm-cifar10-32
    python -m diffusion_jax.main --config=configs/cifar10.py \
        --workdir=runs/ddpm-cifar10-32 --mode=sample

The config must describe the checkpoint's network and DDPMScheduler (configs/cifar10.py matches
google/ddpm-cifar10-32, configs/lsun_church.py google/ddpm-church-256); any difference is
reported as the --config overrides that fix it. The converted weights become both `params` and
`ema_params` of a step-0 train state, so --mode=train fine-tunes them.
"""

import json
import logging
import os
import sys

import jax
from absl import flags

from diffusion_jax import checkpointing
from diffusion_jax import config_cli
from diffusion_jax import pretrained
from diffusion_jax import train_state as train_state_lib

FLAGS = flags.FLAGS
flags.DEFINE_string('diffusers', None, 'Folder of a diffusers UNet2DModel checkpoint or pipeline '
                    '(config.json + diffusion_pytorch_model.safetensors/.bin, or them in unet/).')


def expected_config(path):
    """{config key: value} that the checkpoint at `path` (and its scheduler, if found) implies."""
    model_dir = pretrained.find_model_dir(path)
    unet = pretrained.unet_kwargs(pretrained.read_json(os.path.join(model_dir, 'config.json')))
    expected = {f'model.{k}': v for k, v in unet['model'].items()}
    expected.update({'model.resamp_with_conv': True, 'data.image_size': unet['image_size'],
                     'data.channels': unet['channels']})
    scheduler_path = pretrained.find_scheduler_config(path)
    if scheduler_path is None:
        logging.warning('No scheduler_config.json in %s: the diffusion settings are unchecked',
                        path)
        return expected
    scheduler = pretrained.diffusion_settings(pretrained.read_json(scheduler_path))
    expected.update({f'diffusion.{k}': v for k, v in scheduler['diffusion'].items()})
    expected['sampling.clip_denoised'] = scheduler['clip_denoised']
    return expected


def config_mismatches(config, expected):
    """The `--config.key=value` overrides that make `config` describe the checkpoint."""
    def normalise(value):
        return tuple(value) if isinstance(value, (list, tuple)) else value

    fixes = []
    for key, want in expected.items():
        section, field = key.split('.')
        have = config[section][field]
        if isinstance(want, float) and isinstance(have, float):
            same = abs(have - want) <= 1e-12 * max(abs(want), 1.0)
        else:
            same = normalise(have) == normalise(want)
        if not same:
            fixes.append(f"--config.{key}='{want}'" if isinstance(want, tuple)
                         else f'--config.{key}={want}')
    return fixes


def convert(config, diffusers_path, workdir):
    """Writes config.json, conversion.json and a step-0 orbax checkpoint to `workdir`.

    Raises:
      pretrained.ConversionError: the checkpoint is not the DDPM U-Net or the config differs.
      FileExistsError: `workdir` already holds checkpoints (nothing is overwritten).
    """
    expected = expected_config(diffusers_path)
    fixes = config_mismatches(config, expected)
    if fixes:
        raise pretrained.ConversionError(
            f'the config does not describe the checkpoint in {diffusers_path}; add: '
            + ' '.join(fixes))
    manager = checkpointing.make_manager(workdir, keep=config.training.keep_checkpoints)
    if manager.latest_step() is not None:
        raise FileExistsError(f'{workdir} already holds checkpoints (latest step '
                              f'{manager.latest_step()}); convert into an empty workdir')
    _, params = pretrained.load_diffusers_unet(diffusers_path)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    logging.info('Converted %s parameters from %s', f'{num_params:,}', diffusers_path)
    optimizer = train_state_lib.make_optimizer(
        config.optim, clip=not config.training.clip_per_replica)
    state = train_state_lib.create_train_state(jax.tree.map(jax.numpy.asarray, params), optimizer)
    checkpointing.save_config(workdir, config)
    checkpointing.save(manager, 0, state, {'next_batch': 0, 'seed': config.seed}, force=True)
    manager.wait_until_finished()
    manager.close()
    if jax.process_index() == 0:
        with open(os.path.join(workdir, 'conversion.json'), 'w') as f:
            json.dump({'source': os.path.abspath(diffusers_path), 'num_params': int(num_params),
                       'implied_config': expected}, f, indent=2)
    return state


def main(argv):
    del argv
    config_cli.setup_logging()
    try:
        convert(FLAGS.config, FLAGS.diffusers, FLAGS.workdir)
    except (pretrained.ConversionError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f'FATAL convert: {e}')


if __name__ == '__main__':
    flags.mark_flags_as_required(['diffusers'])
    config_cli.run(main)

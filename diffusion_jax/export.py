"""`--mode=export`: a trained run's EMA weights as a diffusers `DDPMPipeline` folder.

    python -m diffusion_jax.main --config=configs/mnist.py --workdir=runs/mnist --mode=export

writes `WORKDIR/diffusers/` as `DDPMPipeline.save_pretrained` lays it out: `model_index.json`,
`unet/config.json` with `unet/diffusion_pytorch_model.safetensors` (a `UNet2DModel`), and
`scheduler/scheduler_config.json` (a `DDPMScheduler`: betas, variance type, clipping, prediction
type). Then `DDPMPipeline.from_pretrained(path)` samples with it in PyTorch, and
`huggingface_hub.upload_folder` publishes it. It is the inverse of `pretrained.load_diffusers_unet`.

What cannot be exported, and why: class-conditional U-Nets (`model.num_classes > 0`: our label
embedding has no `UNet2DModel` equivalent that `DDPMPipeline` would feed), the dual-output and
x_{t-1}-predicting models and the `learned` (unbounded) variance (no `DDPMScheduler` setting
reads them), score-SDE and NCSN processes (not a DDPM), and noisy classifiers.
"""

import json
import logging
import os

import jax
import numpy as np

from diffusion_jax import parallel
from diffusion_jax import pretrained
from diffusion_jax import schedules
from diffusion_jax import train

# Schedules DDPMScheduler computes itself from (beta_start, beta_end); the others go as
# `trained_betas` (the table itself).
_NAMED_SCHEDULES = ('linear', 'quad', 'cosine')


def check_exportable(config):
    """Raises pretrained.ConversionError naming why `config`'s model has no diffusers form."""
    problems = []
    if config.task != 'diffusion':
        problems.append(f'task={config.task!r} (only diffusion models)')
    if config.diffusion.process != 'ddpm':
        problems.append(f'diffusion.process={config.diffusion.process!r} (DDPMScheduler is the '
                        'discrete DDPM process only)')
    if config.model.num_classes:
        problems.append(f'model.num_classes={config.model.num_classes} (DDPMPipeline is '
                        'unconditional)')
    if config.diffusion.mean_type not in ('eps', 'x0'):
        problems.append(f'diffusion.mean_type={config.diffusion.mean_type!r} (DDPMScheduler '
                        'predicts epsilon or the sample)')
    if config.diffusion.var_type not in ('fixedlarge', 'fixedsmall', 'learned_range'):
        problems.append(f'diffusion.var_type={config.diffusion.var_type!r} (DDPMScheduler: '
                        'fixed_large, fixed_small, learned_range)')
    if problems:
        raise pretrained.ConversionError('cannot export to diffusers: ' + '; '.join(problems))


def to_state_dict(params, num_levels):
    """Our parameter tree as a diffusers `UNet2DModel` state dict (PyTorch layouts, float32)."""
    state_dict = {}

    def put(path, leaf):
        names = [p.key for p in path]
        key = pretrained.candidate_keys(names[:-1], names[-1], num_levels)[0]
        value = np.asarray(leaf, np.float32)
        if value.ndim == 4:  # Conv HWIO -> OIHW.
            value = value.transpose(3, 2, 0, 1)
        elif value.ndim == 2:  # Dense [in, out] -> Linear [out, in]; NIN -> a 1x1 Conv2d.
            value = value.T
            if names[-2] == 'nin_shortcut':
                value = value[:, :, None, None]
        state_dict[key] = np.ascontiguousarray(value)

    jax.tree_util.tree_map_with_path(put, params)
    return state_dict


def scheduler_config(diffusion_config, clip_denoised):
    """The DDPMScheduler config; schedules it cannot compute go as `trained_betas`."""
    d = dict(diffusion_config)
    named = d['beta_schedule'] in _NAMED_SCHEDULES
    config = pretrained.diffusers_scheduler_config(
        dict(d, beta_schedule=d['beta_schedule'] if named else 'linear'), clip_denoised)
    if not named:
        betas = schedules.get_beta_schedule(d['beta_schedule'], beta_start=d['beta_start'],
                                            beta_end=d['beta_end'],
                                            num_timesteps=d['num_timesteps'])
        config['trained_betas'] = [float(b) for b in betas]
    return dict(config, _class_name='DDPMScheduler')


def write_diffusers_folder(out_dir, *, params, model_config, diffusion_config, image_size,
                           channels, clip_denoised):
    """Writes `out_dir` in the `DDPMPipeline.save_pretrained` layout; returns `out_dir`."""
    from safetensors.numpy import save_file
    unet_config = pretrained.diffusers_unet_config(dict(model_config), image_size, channels)
    for sub in ('unet', 'scheduler'):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    save_file(to_state_dict(params, len(model_config['ch_mult'])),
              os.path.join(out_dir, 'unet', pretrained.WEIGHT_FILES[0]))
    files = {
        'model_index.json': dict(_class_name='DDPMPipeline', unet=['diffusers', 'UNet2DModel'],
                                 scheduler=['diffusers', 'DDPMScheduler']),
        'unet/config.json': dict(unet_config, _class_name='UNet2DModel'),
        'scheduler/scheduler_config.json': scheduler_config(diffusion_config, clip_denoised),
    }
    for name, content in files.items():
        with open(os.path.join(out_dir, name), 'w') as f:
            json.dump(content, f, indent=2, default=list)
    return out_dir


def export(config, workdir):
    """`--mode=export`: the latest checkpoint's EMA weights to `WORKDIR/diffusers/`."""
    check_exportable(config)
    model_config = config.model.to_dict()
    # Checked before the restore: a U-Net diffusers cannot express fails in seconds.
    pretrained.diffusers_unet_config(model_config, config.data.image_size, config.data.channels)
    _, ema_params, step = train.restore_ema_params(config, workdir, parallel.make_mesh())
    if jax.process_index() != 0:
        return None
    out_dir = write_diffusers_folder(
        os.path.join(workdir, 'diffusers'), params=jax.device_get(ema_params),
        model_config=model_config, diffusion_config=config.diffusion.to_dict(),
        image_size=config.data.image_size, channels=config.data.channels,
        clip_denoised=config.sampling.clip_denoised)
    logging.info('Exported the EMA weights of step %d to %s (DDPMPipeline.from_pretrained)',
                 step, out_dir)
    return out_dir

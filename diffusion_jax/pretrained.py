"""The released DDPM weights: diffusers `UNet2DModel` checkpoints mapped onto our U-Net.

The public `google/ddpm-cifar10-32`, `google/ddpm-church-256`, ... models are the paper's TF
checkpoints converted to the diffusers layout: a `config.json` for `UNet2DModel`, the weights in
`diffusion_pytorch_model.safetensors` (read here with NumPy, no torch) or `.bin` (needs torch), and
the `DDPMScheduler` settings in `scheduler_config.json`. Both networks are the same U-Net; only the
names and the weight layouts (PyTorch OIHW / [out, in] vs Flax HWIO / [in, out]) differ.
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import errors
from diffusion_jax.models import UNet
from diffusion_jax.models import layers

WEIGHT_FILES = ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin')

# UNet2DModel's constructor defaults (diffusers 0.42): what a key missing from config.json means.
_DIFFUSERS_DEFAULTS = {
    'sample_size': None, 'in_channels': 3, 'out_channels': 3, 'center_input_sample': False,
    'time_embedding_type': 'positional', 'time_embedding_dim': None, 'freq_shift': 0,
    'flip_sin_to_cos': True, 'mid_block_type': 'UNetMidBlock2D',
    'down_block_types': ('DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D'),
    'up_block_types': ('AttnUpBlock2D', 'AttnUpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
    'block_out_channels': (224, 448, 672, 896), 'layers_per_block': 2,
    'mid_block_scale_factor': 1, 'downsample_padding': 1, 'downsample_type': 'conv',
    'upsample_type': 'conv', 'act_fn': 'silu', 'attention_head_dim': 8, 'norm_num_groups': 32,
    'attn_norm_num_groups': None, 'norm_eps': 1e-5, 'resnet_time_scale_shift': 'default',
    'add_attention': True, 'class_embed_type': None, 'num_class_embeds': None,
}
# The settings our U-Net (the paper's) has fixed, with the value they must have.
_REQUIRED = {
    'act_fn': 'silu', 'time_embedding_type': 'positional', 'flip_sin_to_cos': False,
    'freq_shift': 1, 'center_input_sample': False, 'downsample_padding': 0,
    'downsample_type': 'conv', 'upsample_type': 'conv', 'mid_block_type': 'UNetMidBlock2D',
    'mid_block_scale_factor': 1, 'resnet_time_scale_shift': 'default', 'add_attention': True,
    'class_embed_type': None, 'num_class_embeds': None, 'norm_eps': layers.GROUP_NORM_EPSILON,
}

# Our submodule names -> diffusers'; the leading alternative is the current diffusers name, the
# second the legacy one some hub checkpoints still use (diffusers renames them on load too).
_SUBMODULES = {
    'temb_proj': ('time_emb_proj',), 'nin_shortcut': ('conv_shortcut',),
    'norm': ('group_norm',), 'q': ('to_q', 'query'), 'k': ('to_k', 'key'),
    'v': ('to_v', 'value'), 'proj_out': ('to_out.0', 'proj_attn'),
}
_TOP_LEVEL = {'temb_dense0': 'time_embedding.linear_1', 'temb_dense1': 'time_embedding.linear_2',
              'norm_out': 'conv_norm_out', 'mid_block_1': 'mid_block.resnets.0',
              'mid_attn_1': 'mid_block.attentions.0', 'mid_block_2': 'mid_block.resnets.1'}
_LEVEL_MODULE = re.compile(r'(down|up)_(\d+)_(block|attn|downsample|upsample)(?:_(\d+))?$')
_LEVEL_KINDS = {'block': 'resnets.{j}', 'attn': 'attentions.{j}', 'downsample': 'downsamplers.0',
                'upsample': 'upsamplers.0'}

# DDPMScheduler settings -> our diffusion config.
_BETA_SCHEDULES = {'linear': 'linear', 'scaled_linear': 'quad', 'squaredcos_cap_v2': 'cosine'}
_VARIANCE_TYPES = {'fixed_small': 'fixedsmall', 'fixed_large': 'fixedlarge',
                   'learned_range': 'learned_range'}
_PREDICTION_TYPES = {'epsilon': 'eps', 'sample': 'x0'}


class ConversionError(errors.UserError, ValueError):
    """A diffusers checkpoint that does not describe (or does not fit) the paper's U-Net."""


def find_model_dir(path):
    """The folder holding the UNet's config.json: `path` itself or its `unet/` subfolder."""
    for candidate in (path, os.path.join(path, 'unet')):
        if os.path.isfile(os.path.join(candidate, 'config.json')) and any(
                os.path.isfile(os.path.join(candidate, f)) for f in WEIGHT_FILES):
            return candidate
    raise FileNotFoundError(
        f'{path} holds no diffusers UNet2DModel: expected config.json and one of {WEIGHT_FILES} '
        'in it or in its unet/ subfolder')


def read_json(path):
    with open(path) as f:
        return json.load(f)


def unet_kwargs(unet_config):
    """Our `UNet` fields (and the image size and channels) from a UNet2DModel config.json dict.

    Raises:
      ConversionError naming every setting our U-Net cannot reproduce.
    """
    def get(key):
        return unet_config.get(key, _DIFFUSERS_DEFAULTS[key])

    problems = [f'{key}={get(key)!r} (need {want!r})' for key, want in _REQUIRED.items()
                if get(key) != want]
    widths = list(get('block_out_channels'))
    ch = widths[0]
    if any(w % ch for w in widths):
        problems.append(f'block_out_channels={widths} must be multiples of the first')
    down, up = list(get('down_block_types')), list(get('up_block_types'))
    known_down, known_up = {'DownBlock2D', 'AttnDownBlock2D'}, {'UpBlock2D', 'AttnUpBlock2D'}
    if set(down) - known_down or set(up) - known_up or len(down) != len(widths):
        problems.append(f'block types {down} / {up} (need one of {sorted(known_down)} per '
                        f'level down and {sorted(known_up)} up)')
    elif [b.startswith('Attn') for b in down] != [b.startswith('Attn') for b in reversed(up)]:
        problems.append(f'attention at different levels down {down} and up {up}')
    head_dim = get('attention_head_dim')
    if head_dim is not None and any(
            head_dim != w for w, b in zip(widths, down) if b.startswith('Attn')):
        problems.append(f'attention_head_dim={head_dim}: our attention has a single head')
    groups = get('norm_num_groups')
    if get('attn_norm_num_groups') not in (None, groups):
        problems.append('attn_norm_num_groups differs from norm_num_groups')
    if get('time_embedding_dim') not in (None, 4 * ch):
        problems.append(f'time_embedding_dim={get("time_embedding_dim")} (need {4 * ch})')
    in_ch, out_ch = get('in_channels'), get('out_channels')
    if out_ch not in (in_ch, 2 * in_ch):
        problems.append(f'out_channels={out_ch} with in_channels={in_ch}')
    size = get('sample_size')
    if not isinstance(size, int):
        problems.append(f'sample_size={size!r} (need one int: square images)')
    if problems:
        raise ConversionError('the diffusers UNet2DModel differs from the DDPM U-Net: '
                              + '; '.join(problems))
    return dict(
        model=dict(ch=ch, out_ch=out_ch, ch_mult=tuple(w // ch for w in widths),
                   num_res_blocks=get('layers_per_block'), num_groups=groups,
                   attn_resolutions=tuple(size // 2 ** i for i, b in enumerate(down)
                                          if b.startswith('Attn'))),
        image_size=size, channels=in_ch)


def diffusers_unet_config(model_config, image_size, channels):
    """The UNet2DModel config.json dict of our U-Net (the inverse of `unet_kwargs`).

    Args:
      model_config: our `UNet` fields (a config's `model` block).
      image_size, channels: the data's.
    """
    ch, ch_mult = model_config['ch'], tuple(model_config['ch_mult'])
    attn_levels = [image_size // 2 ** i in tuple(model_config['attn_resolutions'])
                   for i in range(len(ch_mult))]
    if not model_config.get('resamp_with_conv', True):
        raise ConversionError('UNet2DModel always resamples with convolutions')
    return dict(
        _REQUIRED, sample_size=image_size, in_channels=channels,
        out_channels=model_config['out_ch'], block_out_channels=tuple(ch * m for m in ch_mult),
        layers_per_block=model_config['num_res_blocks'],
        norm_num_groups=model_config['num_groups'], attention_head_dim=None,
        dropout=model_config.get('dropout', 0.0),
        down_block_types=tuple('AttnDownBlock2D' if a else 'DownBlock2D' for a in attn_levels),
        up_block_types=tuple('AttnUpBlock2D' if a else 'UpBlock2D'
                             for a in reversed(attn_levels)))


def diffusion_settings(scheduler_config):
    """Our `diffusion` config fields and `clip_denoised` from a DDPMScheduler config dict."""
    get = scheduler_config.get
    problems = []
    if get('trained_betas') is not None:
        problems.append('trained_betas are not supported')
    for key, table, default in (('beta_schedule', _BETA_SCHEDULES, 'linear'),
                                ('variance_type', _VARIANCE_TYPES, 'fixed_small'),
                                ('prediction_type', _PREDICTION_TYPES, 'epsilon')):
        if get(key, default) not in table:
            problems.append(f'{key}={get(key)!r} (supported: {sorted(table)})')
    if get('thresholding', False):
        problems.append('thresholding=True is not supported')
    if get('clip_sample', True) and get('clip_sample_range', 1.0) != 1.0:
        problems.append(f'clip_sample_range={get("clip_sample_range")} (need 1.0)')
    if problems:
        raise ConversionError('the DDPMScheduler settings are not supported: '
                              + '; '.join(problems))
    return dict(
        diffusion=dict(beta_schedule=_BETA_SCHEDULES[get('beta_schedule', 'linear')],
                       beta_start=float(get('beta_start', 1e-4)),
                       beta_end=float(get('beta_end', 0.02)),
                       num_timesteps=int(get('num_train_timesteps', 1000)),
                       var_type=_VARIANCE_TYPES[get('variance_type', 'fixed_small')],
                       mean_type=_PREDICTION_TYPES[get('prediction_type', 'epsilon')]),
        clip_denoised=bool(get('clip_sample', True)))


def diffusers_scheduler_config(diffusion_config, clip_denoised):
    """The DDPMScheduler config dict of our diffusion settings (the inverse of
    `diffusion_settings`)."""
    def inverse(table, value, key):
        matches = [k for k, v in table.items() if v == value]
        if not matches:
            raise ConversionError(f'{key}={value!r} has no DDPMScheduler equivalent')
        return matches[0]

    d = diffusion_config
    return dict(num_train_timesteps=d['num_timesteps'], beta_start=d['beta_start'],
                beta_end=d['beta_end'],
                beta_schedule=inverse(_BETA_SCHEDULES, d['beta_schedule'], 'beta_schedule'),
                variance_type=inverse(_VARIANCE_TYPES, d['var_type'], 'var_type'),
                prediction_type=inverse(_PREDICTION_TYPES, d['mean_type'], 'mean_type'),
                clip_sample=bool(clip_denoised))


def find_scheduler_config(path):
    """scheduler_config.json next to the model, in `path/scheduler/`, or None."""
    model_dir = find_model_dir(path)
    for folder in (path, model_dir, os.path.join(path, 'scheduler'),
                   os.path.join(os.path.dirname(os.path.normpath(model_dir)), 'scheduler')):
        candidate = os.path.join(folder, 'scheduler_config.json')
        if os.path.isfile(candidate):
            return candidate
    return None


def read_state_dict(model_dir):
    """The checkpoint's tensors as float32 NumPy arrays, by diffusers name."""
    safetensors_path = os.path.join(model_dir, WEIGHT_FILES[0])
    if os.path.isfile(safetensors_path):
        from safetensors.numpy import load_file
        try:
            tensors = load_file(safetensors_path)
        except Exception as e:  # safetensors raises its own error types for corrupt files.
            raise ConversionError(f'cannot read {safetensors_path}: {e}') from e
    else:
        try:
            import torch
        except ImportError as e:
            raise ImportError(f'{model_dir} has only {WEIGHT_FILES[1]}, a torch pickle: install '
                              "torch (pip install -e '.[parity]') or convert it to safetensors"
                              ) from e
        loaded = torch.load(os.path.join(model_dir, WEIGHT_FILES[1]), map_location='cpu',
                            weights_only=True)
        tensors = {k: v.float().numpy() for k, v in loaded.items()}
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def _diffusers_module(path, num_levels):
    """diffusers' name for one of our modules (up_3_block_1 -> up_blocks.0.resnets.1), as a
    list: the top-level name, then the alternatives for each submodule name."""
    top, *rest = path
    if top in _TOP_LEVEL:
        top = _TOP_LEVEL[top]
    elif (match := _LEVEL_MODULE.match(top)):
        direction, level, kind, j = match.groups()
        # diffusers numbers the up blocks in the order they run, from the lowest resolution.
        block = int(level) if direction == 'down' else num_levels - 1 - int(level)
        top = f'{direction}_blocks.{block}.' + _LEVEL_KINDS[kind].format(j=j)
    return [top] + [_SUBMODULES.get(name, (name,)) for name in rest]


def candidate_keys(module_path, leaf, num_levels):
    """diffusers keys that may hold our parameter (current name first, then the legacy one)."""
    top, *subs = _diffusers_module(module_path, num_levels)
    suffix = 'bias' if leaf == 'bias' else 'weight'
    prefixes = [top]
    for alternatives in subs:
        prefixes = [f'{p}.{a}' for p in prefixes for a in alternatives]
    return [f'{p}.{suffix}' for p in prefixes]


def _to_flax_layout(tensor, target_shape):
    """PyTorch layout -> Flax layout for a conv kernel, a Linear or a 1x1-conv (NIN) kernel."""
    if len(target_shape) == 4:  # Conv2d OIHW -> HWIO.
        return tensor.transpose(2, 3, 1, 0)
    if len(target_shape) == 2:  # Linear [out, in] (or a 1x1 conv [out, in, 1, 1]) -> [in, out].
        return tensor.reshape(tensor.shape[0], tensor.shape[1]).T
    return tensor


def convert_state_dict(state_dict, model, image_size, channels):
    """Our parameter tree for `model`, filled from a diffusers state dict.

    Raises:
      ConversionError listing missing, unused or mis-shaped tensors.
    """
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, channels)),
                           jnp.zeros((1,), jnp.int32))['params'])
    used, problems = set(), []

    def fill(path, leaf):
        names = [p.key for p in path]
        keys = candidate_keys(names[:-1], names[-1], len(model.ch_mult))
        key = next((k for k in keys if k in state_dict), None)
        if key is None:
            problems.append(f'missing {keys[0]} (for {"/".join(names)})')
            return None
        used.add(key)
        value = state_dict[key]
        if value.size != leaf.size:
            problems.append(f'{key} has shape {value.shape}, {"/".join(names)} needs {leaf.shape}')
            return None
        return _to_flax_layout(value, leaf.shape)

    params = jax.tree_util.tree_map_with_path(fill, abstract)
    unused = sorted(set(state_dict) - used)
    if unused:
        problems.append(f'{len(unused)} tensors match no parameter, e.g. {unused[:3]}')
    if problems:
        raise ConversionError('the checkpoint does not fit the U-Net: ' + '; '.join(problems[:8]))
    return params


def load_diffusers_unet(path):
    """(UNet module, params) of a diffusers UNet2DModel checkpoint folder (or pipeline folder).

    Args:
      path: a folder with config.json and diffusion_pytorch_model.{safetensors,bin}, or a
        pipeline folder with them in unet/ (e.g. a download of google/ddpm-cifar10-32).

    Returns:
      (UNet, params): `UNet(**kwargs)` in float32 and its parameters as NumPy arrays, such that
      `model.apply({'params': params}, x, t)` on NHWC input equals diffusers' forward on NCHW.
    """
    model_dir = find_model_dir(path)
    kwargs = unet_kwargs(read_json(os.path.join(model_dir, 'config.json')))
    model = UNet(**kwargs['model'], dropout=0.0)
    params = convert_state_dict(read_state_dict(model_dir), model, kwargs['image_size'],
                                kwargs['channels'])
    return model, params

"""Released-weights parity: diffusers UNet2DModel / DDPMScheduler (the real peer) vs our port.

The networks here have random weights (no download): the configs are those of the public
google/ddpm-cifar10-32 and google/ddpm-church-256 checkpoints, saved with diffusers'
save_pretrained exactly as the hub files are laid out, then read back by our converter.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_python
from configs import tiny as tiny_config
from diffusion_jax import convert
from diffusion_jax import parallel
from diffusion_jax import pretrained
from diffusion_jax import sampling
from diffusion_jax import train

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
safetensors_numpy = pytest.importorskip('safetensors.numpy')

# The paper's U-Net as diffusers describes it (the hub config.json of the google/ddpm-* models).
DDPM_UNET = dict(act_fn='silu', attention_head_dim=None, center_input_sample=False,
                 downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, layers_per_block=2,
                 mid_block_scale_factor=1, norm_eps=1e-6, norm_num_groups=32,
                 time_embedding_type='positional', in_channels=3, out_channels=3)
CIFAR10_32 = dict(DDPM_UNET, sample_size=32, block_out_channels=(128, 256, 256, 256),
                  down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D',
                                    'DownBlock2D'),
                  up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'))
CHURCH_256 = dict(DDPM_UNET, sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512),
                  down_block_types=('DownBlock2D',) * 4 + ('AttnDownBlock2D', 'DownBlock2D'),
                  up_block_types=('UpBlock2D', 'AttnUpBlock2D') + ('UpBlock2D',) * 4)
# configs/tiny.py as a UNet2DModel: 8x8 digits, 1 channel, attention at 4x4.
TINY = dict(DDPM_UNET, sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
            layers_per_block=1, norm_num_groups=4,
            down_block_types=('DownBlock2D', 'AttnDownBlock2D'),
            up_block_types=('AttnUpBlock2D', 'UpBlock2D'))


def save_random_unet(path, unet_config, *, seed=0, scheduler=None, safe_serialization=True):
    """A UNet2DModel with random weights (GroupNorm affines and biases too) saved to `path`."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**unet_config).eval()
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if 'norm' in name or name.endswith('bias'):
                param.add_(0.2 * torch.randn_like(param))  # Not 1 / 0: a swap would show.
    unet.save_pretrained(path, safe_serialization=safe_serialization)
    if scheduler is not None:
        diffusers.DDPMScheduler(**scheduler).save_pretrained(path)
    return unet


def torch_forward(unet, x_nhwc, t):
    with torch.no_grad():
        out = unet(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))),
                   torch.from_numpy(np.asarray(t))).sample
    return out.numpy().transpose(0, 2, 3, 1)


def relative_error(ours, reference):
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


@pytest.fixture(scope='module')
def cifar_unet(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('ddpm-cifar10-32'))
    unet = save_random_unet(path, CIFAR10_32, scheduler=dict(
        num_train_timesteps=1000, beta_schedule='linear', beta_start=1e-4, beta_end=0.02,
        variance_type='fixed_large', clip_sample=True))
    model, params = pretrained.load_diffusers_unet(path)
    return path, unet, model, params


@pytest.mark.parametrize('name', ['cifar10-32', 'church-256'])
def test_forward_matches_diffusers(name, cifar_unet, tmp_path):
    if name == 'cifar10-32':
        _, unet, model, params = cifar_unet
        t = np.array([0, 1, 500, 999])
    else:
        unet = save_random_unet(str(tmp_path), CHURCH_256, seed=1)
        model, params = pretrained.load_diffusers_unet(str(tmp_path))
        t = np.array([7, 930])
    assert sum(x.size for x in jax.tree.leaves(params)) == sum(
        p.numel() for p in unet.parameters())
    size = unet.config.sample_size
    x = np.random.default_rng(0).standard_normal((len(t), size, size, 3)).astype(np.float32)
    reference = torch_forward(unet, x, t)
    # XLA's optimizations do not change what is computed; off, the 113.7M-parameter net
    # compiles in a fraction of the time.
    previous = jax.config.values['jax_disable_most_optimizations']
    jax.config.update('jax_disable_most_optimizations', name == 'church-256' or previous)
    try:
        ours = np.asarray(jax.jit(model.apply)({'params': params}, x, t))
    finally:
        jax.config.update('jax_disable_most_optimizations', previous)
    print(f'{name}: relative error {relative_error(ours, reference):.2e}, max abs '
          f'{np.abs(ours - reference).max():.2e} of max |out| {np.abs(reference).max():.2f}')
    assert relative_error(ours, reference) <= 1e-4
    assert np.abs(ours - reference).max() <= 1e-4 * np.abs(reference).max()
    # Each image depends on its own t: a t-embedding mix-up would not pass the check above,
    # and the check could fail: the outputs at different t really differ.
    assert relative_error(ours[:1], ours[1:2]) > 1e-2


def ddpm_scheduler_chain(unet, scheduler, x_t, noises, monkeypatch):
    """diffusers' DDPMPipeline loop for len(noises) steps, with our noise injected.

    diffusers draws no noise at t = 0 (our sampler draws it and masks it out).
    """
    from diffusers.schedulers import scheduling_ddpm
    queue = [torch.from_numpy(np.array(n.transpose(0, 3, 1, 2))) for n in noises]
    monkeypatch.setattr(scheduling_ddpm, 'randn_tensor', lambda *a, **k: queue.pop(0))
    scheduler.set_timesteps(scheduler.config.num_train_timesteps)
    x = torch.from_numpy(np.ascontiguousarray(x_t.transpose(0, 3, 1, 2)))
    timesteps = scheduler.timesteps[:len(noises)]
    with torch.no_grad():
        for t in timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    assert len(queue) == int(timesteps[-1] == 0)  # Every step took its noise from the queue.
    return x.numpy().transpose(0, 2, 3, 1)


def our_chain(model, params, diffusion, x_t, rng, num_steps, clip):
    model_apply = train.make_model_apply(model)
    x, _ = sampling.reverse_steps(model_apply, params, diffusion, jnp.asarray(x_t), rng,
                                  jnp.int32(diffusion.num_timesteps - 1), num_steps=num_steps,
                                  clip_denoised=clip)
    return np.asarray(x)


def step_noises(rng, shape, t_first, num_steps):
    """The noise our sampler draws at t = t_first, t_first - 1, ... (fold_in(rng, t))."""
    return [np.asarray(jax.random.normal(jax.random.fold_in(rng, t), shape, jnp.float32))
            for t in range(t_first, t_first - num_steps, -1)]


def test_20_ancestral_steps_match_ddpm_scheduler_fixed_large(cifar_unet, monkeypatch):
    path, unet, model, params = cifar_unet
    settings = pretrained.diffusion_settings(
        pretrained.read_json(os.path.join(path, 'scheduler_config.json')))
    assert settings['diffusion']['var_type'] == 'fixedlarge' and settings['clip_denoised']
    config = tiny_config.get_config()
    config.diffusion.update(settings['diffusion'])
    diffusion = train.make_diffusion(config.diffusion)
    rng, num_steps = jax.random.key(3), 20
    x_t = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    noises = step_noises(rng, x_t.shape, 999, num_steps)
    scheduler = diffusers.DDPMScheduler.from_pretrained(path)
    reference = ddpm_scheduler_chain(unet, scheduler, x_t, noises, monkeypatch)
    ours = our_chain(model, params, diffusion, x_t, rng, num_steps, clip=True)
    error = np.abs(ours - reference).max()
    print(f'20 steps, fixed_large: max abs error {error:.2e}')
    assert error <= 1e-4, error
    assert np.abs(reference - x_t).max() > 0.1  # The 20 steps moved x.


@pytest.mark.parametrize('variance_type,clip', [('fixed_small', True), ('fixed_large', False)])
def test_tiny_chain_matches_ddpm_scheduler(tmp_path, monkeypatch, variance_type, clip):
    """Every step of a short chain, down to t = 0, for both fixed variances."""
    unet = save_random_unet(str(tmp_path), TINY, scheduler=dict(
        num_train_timesteps=20, variance_type=variance_type, clip_sample=clip))
    model, params = pretrained.load_diffusers_unet(str(tmp_path))
    settings = pretrained.diffusion_settings(diffusers.DDPMScheduler.from_pretrained(
        str(tmp_path)).config)
    config = tiny_config.get_config()
    config.diffusion.update(settings['diffusion'])
    diffusion = train.make_diffusion(config.diffusion)
    rng = jax.random.key(5)
    x_t = np.random.default_rng(2).standard_normal((4, 8, 8, 1)).astype(np.float32)
    reference = ddpm_scheduler_chain(unet, diffusers.DDPMScheduler.from_pretrained(
        str(tmp_path)), x_t, step_noises(rng, x_t.shape, 19, 20), monkeypatch)
    ours = our_chain(model, params, diffusion, x_t, rng, 20, clip=clip)
    print(f'tiny, {variance_type}, clip={clip}: max abs error '
          f'{np.abs(ours - reference).max():.2e}')
    assert np.abs(ours - reference).max() <= 1e-4 * max(1.0, np.abs(reference).max())


def test_legacy_attention_names_and_torch_bin_give_the_same_params(tmp_path):
    save_random_unet(str(tmp_path / 'new'), TINY)
    _, params = pretrained.load_diffusers_unet(str(tmp_path / 'new'))
    # Older hub checkpoints name the attention layers query/key/value/proj_attn.
    tensors = safetensors_numpy.load_file(
        str(tmp_path / 'new' / 'diffusion_pytorch_model.safetensors'))
    legacy = {k.replace('to_q', 'query').replace('to_k', 'key').replace('to_v', 'value')
              .replace('to_out.0', 'proj_attn'): v for k, v in tensors.items()}
    assert legacy.keys() != tensors.keys()
    os.makedirs(tmp_path / 'legacy' / 'unet')  # A pipeline folder: the model in unet/.
    safetensors_numpy.save_file(
        legacy, str(tmp_path / 'legacy' / 'unet' / 'diffusion_pytorch_model.safetensors'))
    (tmp_path / 'legacy' / 'unet' / 'config.json').write_text(
        (tmp_path / 'new' / 'config.json').read_text())
    save_random_unet(str(tmp_path / 'bin'), TINY, safe_serialization=False)
    assert (tmp_path / 'bin' / 'diffusion_pytorch_model.bin').is_file()
    for other in ('legacy', 'bin'):
        _, other_params = pretrained.load_diffusers_unet(str(tmp_path / other))
        jax.tree.map(np.testing.assert_array_equal, params, other_params)


@pytest.mark.parametrize('change,message', [
    (dict(attention_head_dim=8), 'single head'),
    (dict(downsample_padding=1), 'downsample_padding=1'),
    (dict(flip_sin_to_cos=True, freq_shift=0), 'flip_sin_to_cos=True'),
    (dict(norm_eps=1e-5), 'norm_eps=1e-05'),
    (dict(up_block_types=('UpBlock2D', 'AttnUpBlock2D')), 'attention at different levels'),
    (dict(down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D')), 'block types'),
])
def test_unet_configs_we_cannot_reproduce_are_named(change, message):
    with pytest.raises(pretrained.ConversionError, match=message):
        pretrained.unet_kwargs(dict(TINY, **change))


def test_mismatched_or_corrupt_weights_are_named(tmp_path):
    save_random_unet(str(tmp_path), TINY)
    weights = tmp_path / 'diffusion_pytorch_model.safetensors'
    tensors = safetensors_numpy.load_file(str(weights))
    config = json.loads((tmp_path / 'config.json').read_text())
    for broken, message in [
            ({k: v for k, v in tensors.items() if 'conv_in' not in k}, 'missing conv_in.weight'),
            (dict(tensors, extra=np.zeros(3, np.float32)), r"match no parameter, e.g. \['extra'\]"),
            (dict(tensors, **{'conv_out.bias': np.zeros(2, np.float32)}),
             r'conv_out.bias has shape \(2,\)')]:
        safetensors_numpy.save_file(broken, str(weights))
        with pytest.raises(pretrained.ConversionError, match=message):
            pretrained.load_diffusers_unet(str(tmp_path))
    weights.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": truncated')
    with pytest.raises(pretrained.ConversionError, match='cannot read'):
        pretrained.load_diffusers_unet(str(tmp_path))
    assert pretrained.unet_kwargs(config)['model']['ch'] == 8


@pytest.mark.parametrize('name,hub_config', [
    ('cifar10', CIFAR10_32), ('lsun_church', CHURCH_256), ('tiny', TINY)])
def test_our_configs_as_unet2dmodel_configs(name, hub_config):
    import importlib
    config = importlib.import_module(f'configs.{name}').get_config()
    exported = pretrained.diffusers_unet_config(config.model, config.data.image_size,
                                                config.data.channels)
    for key, value in hub_config.items():
        assert exported[key] == value, key
    back = pretrained.unet_kwargs(exported)
    for key, value in back['model'].items():
        assert tuple(value) == tuple(config.model[key]) if isinstance(value, tuple) else (
            value == config.model[key]), key


def test_scheduler_settings_map_to_our_diffusion():
    settings = pretrained.diffusion_settings(dict(
        beta_schedule='scaled_linear', beta_start=1e-4, beta_end=0.02, num_train_timesteps=50,
        variance_type='fixed_large', clip_sample=False, prediction_type='sample'))
    assert settings == dict(diffusion=dict(
        beta_schedule='quad', beta_start=1e-4, beta_end=0.02, num_timesteps=50,
        var_type='fixedlarge', mean_type='x0'), clip_denoised=False)
    for clip in (True, False):  # Our settings -> DDPMScheduler config -> our settings.
        config = tiny_config.get_config()
        back = pretrained.diffusion_settings(pretrained.diffusers_scheduler_config(
            config.diffusion, clip))
        assert back['clip_denoised'] == clip
        for key, value in back['diffusion'].items():
            assert value == config.diffusion[key], key
    with pytest.raises(pretrained.ConversionError, match="mean_type='xprev'"):
        pretrained.diffusers_scheduler_config(dict(config.diffusion, mean_type='xprev'), True)
    with pytest.raises(pretrained.ConversionError, match="prediction_type='v_prediction'"):
        pretrained.diffusion_settings(dict(prediction_type='v_prediction'))


def test_config_mismatches_are_reported_as_overrides(cifar_unet):
    from configs import lsun_church
    path = cifar_unet[0]
    fixes = convert.config_mismatches(lsun_church.get_config(), convert.expected_config(path))
    assert fixes == ["--config.model.ch_mult='(1, 2, 2, 2)'", '--config.data.image_size=32',
                     '--config.diffusion.var_type=fixedlarge']
    from configs import cifar10
    assert convert.config_mismatches(cifar10.get_config(), convert.expected_config(path)) == []


def test_convert_cli_then_sample_and_eval(tmp_path, data_dir):
    source, workdir = tmp_path / 'diffusers', tmp_path / 'converted'
    save_random_unet(str(source), TINY, scheduler=dict(
        num_train_timesteps=20, variance_type='fixed_large', clip_sample=True))
    common = ['--config=configs/tiny.py', f'--workdir={workdir}',
              f'--config.data.data_dir={data_dir}']
    # A config that does not fit is refused before anything is written.
    result = run_python(['-m', 'diffusion_jax.convert', f'--diffusers={source}', *common,
                         '--config.model.ch=16'], check=False)
    assert result.returncode != 0 and '--config.model.ch=8' in result.stderr
    assert not workdir.exists()
    run_python(['-m', 'diffusion_jax.convert', f'--diffusers={source}', *common],
               fast_compiles=True)
    assert json.loads((workdir / 'conversion.json').read_text())['num_params'] > 0
    # A second conversion into the same workdir loses nothing.
    result = run_python(['-m', 'diffusion_jax.convert', f'--diffusers={source}', *common],
                        check=False)
    assert result.returncode != 0 and 'already holds checkpoints' in result.stderr
    # The checkpoint holds the converted weights as the EMA weights.
    _, params = pretrained.load_diffusers_unet(str(source))
    config = tiny_config.get_config()
    _, restored, step = train.restore_ema_params(config, str(workdir), parallel.make_mesh())
    assert step == 0
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(restored))
    run_python(['-m', 'diffusion_jax.main', *common, '--mode=sample'], fast_compiles=True)
    with np.load(workdir / 'samples.npz') as f:
        assert f['images'].shape == (16, 8, 8, 1) and f['images'].dtype == np.uint8
    run_python(['-m', 'diffusion_jax.main', *common, '--mode=eval',
                '--config.eval.num_images=8', '--config.eval.batch_size=8'], fast_compiles=True)
    assert np.isfinite(json.loads((workdir / 'eval.json').read_text())['bits_per_dim'])

"""Export to diffusers: the folder loads in diffusers, its UNet2DModel gives our ε, its
DDPMScheduler our betas, and `pretrained.load_diffusers_unet` reads back the same parameters."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_python
from configs import default
from configs import tiny
from diffusion_jax import export
from diffusion_jax import parallel
from diffusion_jax import pretrained
from diffusion_jax import schedules
from diffusion_jax import train
from diffusion_jax.models import UNet

pytestmark = pytest.mark.usefixtures('fast_compiles')  # Compiling dominates; same numbers.
torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

# A 32-pixel two-level U-Net and a 64-pixel four-level one (attention at 16x16 in both).
MODELS = {
    '32px': (32, 3, dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,),
                         num_groups=4, out_ch=3)),
    '64px_multilevel': (64, 3, dict(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                                    attn_resolutions=(16,), num_groups=4, out_ch=3)),
}
TOLERANCE = 1e-5  # Relative L2 error of ε, float32 on both sides (measured: 8.0e-7, 9.1e-7).


def random_params(model, size, channels, seed):
    """Initial parameters with every leaf perturbed: biases and GroupNorm affines not 0 / 1."""
    params = model.init(jax.random.key(seed), jnp.zeros((1, size, size, channels)),
                        jnp.zeros((1,), jnp.int32))['params']
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [np.asarray(x + 0.1 * jax.random.normal(k, x.shape))
                                     for x, k in zip(leaves, keys)])


def model_config(fields):
    config = default.get_config().model
    config.update(fields, dropout=0.0)
    return config


@pytest.mark.parametrize('name', sorted(MODELS))
def test_exported_unet_gives_our_eps_and_reads_back(name, tmp_path):
    size, channels, fields = MODELS[name]
    config = model_config(fields)
    model = UNet(**config.to_dict())
    params = random_params(model, size, channels, seed=len(name))
    out = export.write_diffusers_folder(
        str(tmp_path / 'diffusers'), params=params, model_config=config.to_dict(),
        diffusion_config=default.get_config().diffusion.to_dict(), image_size=size,
        channels=channels, clip_denoised=True)
    unet = diffusers.UNet2DModel.from_pretrained(out, subfolder='unet').eval()
    x = np.random.default_rng(0).standard_normal((3, size, size, channels)).astype(np.float32)
    t = np.array([0, 417, 999])
    with torch.no_grad():
        theirs = unet(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                      torch.from_numpy(t)).sample.numpy().transpose(0, 2, 3, 1)
    ours = np.asarray(jax.jit(lambda p, x, t: model.apply(p, x, t, train=False))(
        {'params': params}, x, t))
    error = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
    print(f'{name}: relative error of the exported UNet2DModel {error:.2e}')
    assert error <= TOLERANCE
    assert float(np.linalg.norm(ours[0] - ours[1])) > 1e-2 * float(np.linalg.norm(ours[0]))
    _, read_back = pretrained.load_diffusers_unet(out)
    jax.tree.map(np.testing.assert_array_equal, read_back, params)
    pipeline = diffusers.DDPMPipeline.from_pretrained(out)
    assert isinstance(pipeline.scheduler, diffusers.DDPMScheduler)


@pytest.mark.parametrize('schedule', ['linear', 'quad', 'cosine', 'jsd', 'warmup10'])
def test_exported_scheduler_has_our_betas_and_settings(schedule, tmp_path):
    diffusion = default.get_config().diffusion
    diffusion.update(beta_schedule=schedule, var_type='fixedsmall', mean_type='x0')
    config = export.scheduler_config(diffusion.to_dict(), clip_denoised=False)
    (tmp_path / 'scheduler_config.json').write_text(json.dumps(config))
    scheduler = diffusers.DDPMScheduler.from_pretrained(str(tmp_path))
    ours = schedules.get_beta_schedule(schedule, 1000, beta_start=1e-4, beta_end=0.02)
    np.testing.assert_allclose(scheduler.betas.double().numpy(), ours, rtol=2e-6, atol=1e-9)
    assert scheduler.config.variance_type == 'fixed_small'
    assert scheduler.config.prediction_type == 'sample'
    assert scheduler.config.clip_sample is False


@pytest.mark.parametrize('change,message', [
    (dict(task='noisy_classifier'), "task='noisy_classifier'"),
    ({'model.num_classes': 10}, 'DDPMPipeline is unconditional'),
    ({'diffusion.mean_type': 'dual'}, "mean_type='dual'"),
    ({'diffusion.var_type': 'learned'}, "var_type='learned'"),
    ({'diffusion.process': 've'}, "process='ve'"),
])
def test_what_cannot_be_exported_is_named(change, message):
    config = tiny.get_config()
    config.update_from_flattened_dict(change)
    with pytest.raises(pretrained.ConversionError, match=message):
        export.check_exportable(config)


def test_export_mode_writes_the_ema_weights(copy_of_trained_tiny, data_dir):
    workdir = copy_of_trained_tiny
    run_python(['-m', 'diffusion_jax.main', '--config=configs/tiny.py', f'--workdir={workdir}',
                f'--config.data.data_dir={data_dir}', '--mode=export'])
    config = tiny.get_config()
    config.data.data_dir = data_dir
    _, ema, _ = train.restore_ema_params(config, str(workdir), parallel.make_mesh())
    _, exported = pretrained.load_diffusers_unet(str(workdir / 'diffusers'))
    jax.tree.map(np.testing.assert_array_equal, exported, jax.device_get(ema))
    scheduler = diffusers.DDPMScheduler.from_pretrained(str(workdir / 'diffusers'),
                                                        subfolder='scheduler')
    assert scheduler.config.num_train_timesteps == config.diffusion.num_timesteps

"""The timed work, ours (JAX) and the peer's (PyTorch + diffusers), built from the same config.

Each workload has `prepare()` (build, compile or warm up; returns its first-call seconds),
`run()` (one timed unit of work, finished when it returns) and `units` (images, or image-steps,
per `run()`). The peer is what a diffusers user writes: `UNet2DModel` with our U-Net's
`config.json` (`pretrained.diffusers_unet_config`), `DDPMScheduler`, Adam, `EMAModel`, eager
mode (or `torch.compile`), on the GPU where torch sees one.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import parallel
from diffusion_jax import pretrained
from diffusion_jax import sampling
from diffusion_jax import train
from diffusion_jax import train_state as train_state_lib


def forward_gflops(config):
    """XLA's FLOP count of one U-Net forward pass on one image, in GFLOP."""
    model = train.make_model(config)
    size, channels = config.data.image_size, config.data.channels
    params = jax.eval_shape(lambda: train.init_params(model, config, jax.random.key(0)))
    x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    lowered = jax.jit(train.make_model_apply(model)).lower(params, x, t)
    return lowered.cost_analysis()['flops'] / 1e9


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class JaxTrain:
    """Our train step (train.py's path: jit + NamedSharding over one device per core, AOT)."""

    def __init__(self, config, batch_size):
        config = config.copy_and_resolve_references()
        config.training.batch_size = batch_size
        self.units = batch_size
        self.mesh = parallel.make_mesh()
        model = train.make_model(config)
        optimizer = train_state_lib.make_optimizer(config.optim)
        self.state, self.shardings, _ = train.init_or_restore_state(
            config, model, optimizer, self.mesh, manager=None)
        self.step_fn = train.build_step(config, model, train.make_diffusion(config.diffusion),
                                        optimizer, self.mesh, self.shardings)
        shape = (batch_size, config.data.image_size, config.data.image_size, config.data.channels)
        images = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
        self.batch = parallel.make_global_batch({'image': images}, self.mesh)
        self.rng = jax.random.key(0)

    def prepare(self):
        seconds = _timed(lambda: setattr(self, 'step_fn', self.step_fn.lower(
            self.state, self.batch, self.rng).compile()))
        self.run()
        return seconds

    def run(self):
        self.state, metrics = self.step_fn(self.state, self.batch, self.rng)
        jax.block_until_ready(metrics)


class JaxSample:
    """Our ancestral sampler: `num_steps` reverse steps as one jitted scan, batch sharded."""

    def __init__(self, config, num_images, num_steps):
        self.units = num_images * num_steps
        mesh = parallel.make_mesh()
        model = train.make_model(config)
        with jax.threefry_partitionable(False):
            self.params = jax.jit(lambda: train.init_params(model, config, jax.random.key(0)))()
        self.model_apply = train.make_model_apply(model)
        self.diffusion = train.make_diffusion(config.diffusion)
        shape = (num_images, config.data.image_size, config.data.image_size, config.data.channels)
        self.x = jax.device_put(jax.random.normal(jax.random.key(1), shape),
                                parallel.data_sharded(mesh))
        self.num_steps, self.clip = num_steps, config.sampling.clip_denoised
        self.t_start = jnp.int32(self.diffusion.num_timesteps - 1)
        self.sample_fn = None

    def prepare(self):
        def compile_():
            self.sample_fn = sampling.reverse_steps.lower(
                self.model_apply, self.params, self.diffusion, self.x, jax.random.key(2),
                self.t_start, num_steps=self.num_steps, clip_denoised=self.clip).compile()
        seconds = _timed(compile_)
        self.run()
        return seconds

    def run(self):
        jax.block_until_ready(self.sample_fn(self.params, self.diffusion, self.x,
                                             jax.random.key(2), self.t_start))


PEER_COMPILE = ('none', 'eager', 'inductor')


def peer_device():
    """Where the peer runs: the GPU when torch sees one, else the CPU."""
    import torch
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def peer_precision(config):
    """The peer's precision for our config's: bfloat16 autocast on a GPU or where the CPU has
    bfloat16 matmul units (else float32, the peer's fastest)."""
    from benchmarks import machine
    bf16 = peer_device() == 'cuda' or machine.has_bf16_matmul()
    return 'bfloat16' if config.model.dtype == 'bfloat16' and bf16 else 'float32'


def _autocast(config):
    import contextlib
    import torch
    if peer_precision(config) == 'bfloat16':
        return torch.autocast(peer_device(), dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _synchronize():
    import torch
    if peer_device() == 'cuda':
        torch.cuda.synchronize()


def _torch_unet(config, train_mode, compile_backend='none'):
    """diffusers' UNet2DModel of our config, on `peer_device()`; `compile_backend` 'inductor'
    is `torch.compile` as a user would call it, 'eager' its graph capture without code
    generation (what the CPU test runs), 'none' eager mode."""
    import diffusers
    import torch
    if compile_backend not in PEER_COMPILE:
        raise ValueError(f'unknown peer compile {compile_backend!r}; valid: {PEER_COMPILE}')
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**pretrained.diffusers_unet_config(
        config.model, config.data.image_size, config.data.channels))
    unet = unet.to(peer_device()).train(train_mode)
    if compile_backend != 'none':
        unet.forward = torch.compile(unet.forward, backend=compile_backend)
    return unet


def _torch_scheduler(config):
    import diffusers
    return diffusers.DDPMScheduler(**pretrained.diffusers_scheduler_config(
        config.diffusion, config.sampling.clip_denoised))


class TorchTrain:
    """The diffusers training step: noise, forward, MSE, backward, clip, Adam, EMA."""

    def __init__(self, config, batch_size, compile_backend='none'):
        import torch
        from diffusers.training_utils import EMAModel
        self.units = batch_size
        self.unet = _torch_unet(config, train_mode=True, compile_backend=compile_backend)
        self.scheduler = _torch_scheduler(config)
        self.optimizer = torch.optim.Adam(self.unet.parameters(), lr=config.optim.learning_rate)
        self.ema = EMAModel(self.unet.parameters(), decay=config.optim.ema_decay)
        size, channels = config.data.image_size, config.data.channels
        self.images = torch.rand(batch_size, channels, size, size, device=peer_device()) * 2 - 1
        self.grad_clip = config.optim.grad_clip
        self.config = config

    def prepare(self):
        return _timed(self.run)

    def run(self):
        import torch
        x0 = self.images
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],),
                          device=x0.device)
        with _autocast(self.config):
            output = self.unet(self.scheduler.add_noise(x0, noise, t), t).sample
        loss = torch.nn.functional.mse_loss(output.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.unet.parameters())
        _synchronize()


class TorchSample:
    """DDPMPipeline's loop: `num_steps` of UNet forward + DDPMScheduler.step, inference mode."""

    def __init__(self, config, num_images, num_steps, compile_backend='none'):
        import torch
        self.units = num_images * num_steps
        self.unet = _torch_unet(config, train_mode=False, compile_backend=compile_backend)
        self.scheduler = _torch_scheduler(config)
        self.scheduler.set_timesteps(config.diffusion.num_timesteps)
        size, channels = config.data.image_size, config.data.channels
        self.generator = torch.Generator(peer_device()).manual_seed(0)
        self.x = torch.randn(num_images, channels, size, size, generator=self.generator,
                             device=peer_device())
        self.num_steps = num_steps
        self.config = config

    def prepare(self):
        return _timed(self.run)

    def run(self):
        import torch
        x = self.x
        with torch.inference_mode():
            for t in self.scheduler.timesteps[:self.num_steps]:
                with _autocast(self.config):
                    output = self.unet(x, t).sample
                x = self.scheduler.step(output.float(), t, x,
                                        generator=self.generator).prev_sample
        _synchronize()
        return x

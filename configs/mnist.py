"""The main job: a small DDPM on the embedded MNIST-5k set, trained and sampled on 2 CPU cores.

    python -m diffusion_jax.main --config=configs/mnist.py --workdir=runs/mnist

Sized for about 20 minutes on 2 CPU cores (measured: 19.6 min on 2 AVX2 cores, of which 8 min
are the 256 samples of 1000 ancestral steps, so the network is small). Batch 32 for 2400 steps
sees the same number of images as batch 64 for 1200 at the same cost per image, with twice the
updates. The paper's optimizer settings are kept except a larger learning rate with a short
warm-up and an EMA that warms up: with a few thousand steps a plain 0.9999 EMA would still be
mostly the initial weights.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.name = 'mnist5k'
    config.data.image_size = 28
    config.data.channels = 1
    config.model.out_ch = 1
    config.model.ch = 16
    config.model.ch_mult = (1, 2, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (7,)
    config.model.dropout = 0.0
    config.model.num_groups = 8
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100
    config.optim.ema_decay = 0.999
    config.optim.ema_warmup = True
    config.training.batch_size = 32
    config.training.num_train_steps = 2400
    config.training.log_every = 50
    config.training.checkpoint_every = 500
    config.training.sample_every = 0
    config.sampling.num_samples = 256
    config.sampling.batch_size = 256
    return config

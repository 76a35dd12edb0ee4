"""A seconds-long run on scikit-learn's 8x8 digits, for tests and smoke checks.

    python -m diffusion_jax.main --config=configs/tiny.py --workdir=/tmp/tiny
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.name = 'digits'
    config.data.image_size = 8
    config.data.channels = 1
    config.model.out_ch = 1
    config.model.ch = 8
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.0
    config.model.num_groups = 4
    config.diffusion.num_timesteps = 20
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 5
    config.optim.ema_decay = 0.99
    config.optim.ema_warmup = True
    config.training.batch_size = 16
    config.training.num_train_steps = 6
    config.training.log_every = 2
    config.training.checkpoint_every = 3
    config.training.sample_grid_size = 16
    config.sampling.num_samples = 16
    config.sampling.batch_size = 16
    config.sampling.chunk_size = 5
    return config

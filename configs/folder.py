"""Your own images: a DDPM on a folder of a few thousand pictures, at 32x32, on CPU or one chip.

    python -m diffusion_jax.main --config=configs/folder.py --workdir=runs/mine \
        --config.data.folder=/path/to/images

Every PNG/JPEG/WebP/BMP under the folder is resized on its short side and centre-cropped to
32x32 RGB (`--config.data.channels=1` for greyscale, `--config.data.image_size` for another
size); diffusion_jax/data/folder.py has the rules and the test split. For a class-conditional
model (classifier-free guidance) put each class in its own subfolder and add
`--config.model.num_classes=K`. The network is the main job's, widened by a level for 32x32
colour; 20,000 steps at batch 64 see a few thousand images a few hundred times each.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.name = 'folder'
    config.data.image_size = 32
    config.data.channels = 3
    config.data.random_flip = True  # Photos may be mirrored; turn off for text or digits.
    config.model.out_ch = 3
    config.model.ch = 32
    config.model.ch_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (8,)
    config.model.dropout = 0.1
    config.model.num_groups = 8
    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 1000
    config.optim.ema_decay = 0.9995
    config.optim.ema_warmup = True
    config.training.batch_size = 64
    config.training.num_train_steps = 20_000
    config.training.log_every = 100
    config.training.checkpoint_every = 2000
    config.training.sample_every = 5000
    config.sampling.num_samples = 64
    config.sampling.batch_size = 64
    return config

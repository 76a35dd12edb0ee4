"""The main job: a small DDPM on the embedded MNIST-5k set, trained and sampled on 2 CPU cores.

    python -m diffusion_jax.main --config=configs/mnist.py --workdir=runs/mnist

Sized for at most 15 minutes on 2 CPU cores, install included, leaving a third of CI's
20 for slower machine states (docs/main_job.md has the timings); about 4 of them are the 256
samples of 1000 ancestral steps, so the network is small. Batch 32 stays the best measured
trade-off between updates and noise per update; 5,000 steps spend the time that tbbmalloc
(issue 30: the train step 1.55x as fast as under the first allocator settings) and the faster
GroupNorm won back. The paper's optimizer settings are kept except a larger learning rate with
a short warm-up and an EMA that warms up: with a few thousand steps a plain 0.9999 EMA would
still be mostly the initial weights.
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
    config.training.num_train_steps = 5000
    config.training.log_every = 50
    config.training.checkpoint_every = 500
    config.training.sample_every = 0
    config.sampling.num_samples = 256
    config.sampling.batch_size = 256
    return config

"""2-D Gaussian mixture with a small MLP score model: trains in seconds, then checks samples (MMD,
sliced Wasserstein vs fresh data) and ODE likelihoods against the closed-form density.

    python -m diffusion_jax.main --config=configs/toy2d.py --workdir=runs/toy2d
    python -m diffusion_jax.main --config=configs/toy2d.py --workdir=runs/toy2d_ve \
        --config.diffusion.process=ve --config.diffusion.sigma_max=5
"""

import ml_collections

from configs import default


def get_config():
    config = default.get_config()
    config.data = ml_collections.ConfigDict(dict(name='gmm2d', num_eval=2000))
    config.model = ml_collections.ConfigDict(dict(hidden=128, num_layers=3))
    config.diffusion.process = 'vp'
    config.diffusion.num_timesteps = 500  # N of the samplers.
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 100
    config.optim.ema_decay = 0.999
    config.optim.ema_warmup = True
    config.training.batch_size = 512
    config.training.num_train_steps = 3000
    config.sampling.sampler = 'pc'
    config.sampling.num_samples = 2000
    config.sampling.batch_size = 2000
    config.sampling.chunk_size = 500
    config.eval.batch_size = 500
    return config

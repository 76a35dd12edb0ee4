"""LSUN church 256x256 (Ho et al. 2020, FID 7.89; 1.2M steps).

Converts and samples the released weights (ddpm-church-256)
(no training yet: configs/hires.py):

    python -m diffusion_jax.convert --config=configs/lsun_church.py \
        --diffusers=/path/to/ddpm-church-256 --workdir=runs/lsun_church
    python -m diffusion_jax.main --config=configs/lsun_church.py \
        --workdir=runs/lsun_church --mode=sample --config.sampling.num_samples=16
"""

from configs import hires


def get_config():
    config = hires.get_config()
    config.data.name = 'lsun_church'
    config.data.random_flip = True
    config.training.num_train_steps = 1_200_000
    return config

"""LSUN bedroom 256x256 (Ho et al. 2020, FID 6.36; 2.4M steps).

Converts and samples the released weights (ddpm-bedroom-256)
(no training yet: configs/hires.py):

    python -m diffusion_jax.convert --config=configs/lsun_bedroom.py \
        --diffusers=/path/to/ddpm-bedroom-256 --workdir=runs/lsun_bedroom
    python -m diffusion_jax.main --config=configs/lsun_bedroom.py \
        --workdir=runs/lsun_bedroom --mode=sample --config.sampling.num_samples=16
"""

from configs import hires


def get_config():
    config = hires.get_config()
    config.data.name = 'lsun_bedroom'
    config.data.random_flip = True
    config.training.num_train_steps = 2_400_000
    return config

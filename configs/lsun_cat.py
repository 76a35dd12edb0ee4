"""LSUN cat 256x256 (Ho et al. 2020, FID 19.75; 1.8M steps; the original code does not flip cats).

Converts and samples the released weights (ddpm-cat-256)
(no training yet: configs/hires.py):

    python -m diffusion_jax.convert --config=configs/lsun_cat.py \
        --diffusers=/path/to/ddpm-cat-256 --workdir=runs/lsun_cat
    python -m diffusion_jax.main --config=configs/lsun_cat.py \
        --workdir=runs/lsun_cat --mode=sample --config.sampling.num_samples=16
"""

from configs import hires


def get_config():
    config = hires.get_config()
    config.data.name = 'lsun_cat'
    config.data.random_flip = False
    config.training.num_train_steps = 1_800_000
    return config

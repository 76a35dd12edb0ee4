"""LSUN church 256x256 (Ho et al. 2020, FID 7.89; 1.2M steps).

    python -m diffusion_jax.main --config=configs/lsun_church.py --workdir=runs/lsun_church \
        --config.data.manual_dir=/path/to/lsun_church

Meant for accelerators (TPU v3-8: ~2.2 steps/s at batch 64); see launch/ for pods.
"""

from configs import hires


def get_config():
    config = hires.get_config()
    config.data.name = 'lsun_church'
    config.data.random_flip = True
    config.training.num_train_steps = 1_200_000
    return config

"""LSUN bedroom 256x256 (Ho et al. 2020, FID 6.36; 2.4M steps).

    python -m diffusion_jax.main --config=configs/lsun_bedroom.py --workdir=runs/lsun_bedroom \
        --config.data.manual_dir=/path/to/lsun_bedroom

Meant for accelerators (TPU v3-8: ~2.2 steps/s at batch 64); see launch/ for pods.
"""

from configs import hires


def get_config():
    config = hires.get_config()
    config.data.name = 'lsun_bedroom'
    config.data.random_flip = True
    config.training.num_train_steps = 2_400_000
    return config

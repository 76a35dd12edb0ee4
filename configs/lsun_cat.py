"""LSUN cat 256x256 (Ho et al. 2020, FID 19.75; 1.8M steps; the original code does not flip cats).

    python -m diffusion_jax.main --config=configs/lsun_cat.py --workdir=runs/lsun_cat \
        --config.data.manual_dir=/path/to/lsun_cat

Meant for accelerators (TPU v3-8: ~2.2 steps/s at batch 64); see launch/ for pods.
"""

from configs import hires


def get_config():
    config = hires.get_config()
    config.data.name = 'lsun_cat'
    config.data.random_flip = False
    config.training.num_train_steps = 1_800_000
    return config

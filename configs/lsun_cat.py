"""LSUN cat 256x256 (Ho et al. 2020, FID 19.75; 1.8M steps; the original code does not flip cats).

Today these settings describe the released weights (ddpm-cat-256); convert and sample:

    python -m diffusion_jax.convert --config=configs/lsun_cat.py \
        --diffusers=/path/to/ddpm-cat-256 --workdir=runs/lsun_cat
    python -m diffusion_jax.main --config=configs/lsun_cat.py \
        --workdir=runs/lsun_cat --mode=sample --config.sampling.num_samples=16

Training needs a dataset builder for data.name='lsun_cat', which does not exist yet (there are
mnist5k, digits and cifar10); the run stops naming the valid datasets. Meant for accelerators
(TPU v3-8: ~2.2 steps/s at batch 64); see launch/ for pods.
"""

from configs import hires


def get_config():
    config = hires.get_config()
    config.data.name = 'lsun_cat'
    config.data.random_flip = False
    config.training.num_train_steps = 1_800_000
    return config

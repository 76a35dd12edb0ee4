"""LSUN bedroom 256x256 (Ho et al. 2020, FID 6.36; 2.4M steps).

Today these settings describe the released weights (ddpm-bedroom-256); convert and sample:

    python -m diffusion_jax.convert --config=configs/lsun_bedroom.py \
        --diffusers=/path/to/ddpm-bedroom-256 --workdir=runs/lsun_bedroom
    python -m diffusion_jax.main --config=configs/lsun_bedroom.py \
        --workdir=runs/lsun_bedroom --mode=sample --config.sampling.num_samples=16

Training needs a dataset builder for data.name='lsun_bedroom', which does not exist yet (there are
mnist5k, digits and cifar10); the run stops naming the valid datasets. Meant for accelerators
(TPU v3-8: ~2.2 steps/s at batch 64); see launch/ for pods.
"""

from configs import hires


def get_config():
    config = hires.get_config()
    config.data.name = 'lsun_bedroom'
    config.data.random_flip = True
    config.training.num_train_steps = 2_400_000
    return config

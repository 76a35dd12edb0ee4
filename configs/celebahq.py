"""CelebA-HQ 256x256 (Ho et al. 2020, Appendix B; 0.5M steps).

Converts and samples the released weights (ddpm-celebahq-256)
(no training yet: configs/hires.py):

    python -m diffusion_jax.convert --config=configs/celebahq.py \
        --diffusers=/path/to/ddpm-celebahq-256 --workdir=runs/celebahq
    python -m diffusion_jax.main --config=configs/celebahq.py \
        --workdir=runs/celebahq --mode=sample --config.sampling.num_samples=16
"""

from configs import hires


def get_config():
    config = hires.get_config()
    config.data.name = 'celebahq'
    config.data.random_flip = True
    config.training.num_train_steps = 500_000
    return config

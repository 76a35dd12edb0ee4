"""CelebA-HQ 256x256 (Ho et al. 2020, Appendix B; 0.5M steps).

Today these settings describe the released weights (ddpm-celebahq-256); convert and sample:

    python -m diffusion_jax.convert --config=configs/celebahq.py \
        --diffusers=/path/to/ddpm-celebahq-256 --workdir=runs/celebahq
    python -m diffusion_jax.main --config=configs/celebahq.py \
        --workdir=runs/celebahq --mode=sample --config.sampling.num_samples=16

Training needs a dataset builder for data.name='celebahq', which does not exist yet (there are
mnist5k, digits and cifar10); the run stops naming the valid datasets. Meant for accelerators
(TPU v3-8: ~2.2 steps/s at batch 64); see launch/ for pods.
"""

from configs import hires


def get_config():
    config = hires.get_config()
    config.data.name = 'celebahq'
    config.data.random_flip = True
    config.training.num_train_steps = 500_000
    return config

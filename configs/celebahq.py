"""CelebA-HQ 256x256 (Ho et al. 2020, Appendix B; 0.5M steps).

    python -m diffusion_jax.main --config=configs/celebahq.py --workdir=runs/celebahq \
        --config.data.manual_dir=/path/to/celebahq

Meant for accelerators (TPU v3-8: ~2.2 steps/s at batch 64); see launch/ for pods.
"""

from configs import hires


def get_config():
    config = hires.get_config()
    config.data.name = 'celebahq'
    config.data.random_flip = True
    config.training.num_train_steps = 500_000
    return config

"""The paper's CIFAR-10 run (Ho et al. 2020: 35.7M parameters, 800k steps, FID 3.17).

    python -m diffusion_jax.main --config=configs/cifar10.py --workdir=runs/cifar10 \
        --config.data.manual_dir=/path/with/cifar-10-binary.tar.gz

Meant for accelerators (TPU v3-8: ~10.6 h); see launch/ for pods.
"""

from configs import default
from diffusion_jax import parallel


def get_config():
    config = default.get_config()
    # The defaults are this run; spelled out here so the config reads as the paper's setup.
    config.data.name = 'cifar10'
    config.data.image_size = 32
    config.data.random_flip = True
    config.model.ch_mult = (1, 2, 2, 2)
    config.model.dropout = 0.1
    config.diffusion.var_type = 'fixedlarge'
    config.training.batch_size = 128
    config.training.num_train_steps = 800_000
    config.training.sample_every = 50_000
    # The Adam moments split over the data-parallel devices (ZeRO-1), with the same update: per
    # device the parameters and their EMA stay whole and 1/D of the two moments remains (on a
    # v3-8's 8 cores 2.25 copies of the 35.7M parameters instead of four).
    config.training.param_sharding = parallel.OPTIMIZER_STATE_RULES
    return config

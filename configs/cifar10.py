"""The paper's CIFAR-10 run (Ho et al. 2020: 35.7M parameters, 800k steps, FID 3.17).

    python -m diffusion_jax.main --config=configs/cifar10.py --workdir=runs/cifar10 \
        --config.data.manual_dir=/path/with/cifar-10-binary.tar.gz

Meant for accelerators (TPU v3-8: ~10.6 h); see launch/ for pods.
"""

from configs import default


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
    # Pure data parallelism: the state is 0.53 GiB per TPU v3 core, and its only collective is
    # one all-reduce of the gradient per step. ZeRO-1 (parallel.OPTIMIZER_STATE_RULES) saved
    # 0.23 GiB there but added an all-gather of twice the gradient's bytes and a slower
    # compiler estimate (18.6 vs 18.2 ms; docs/tpu.md); on the CPU it did not lower the peak.
    config.training.param_sharding = ()
    return config

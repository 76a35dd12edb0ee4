"""Shared settings of the paper's 256x256 models (CelebA-HQ, LSUN): 113.7M parameters.

Not a run of its own; configs/celebahq.py and configs/lsun_*.py start from it. Today those
describe the released weights, to convert and sample: training needs a dataset builder for their
data.name, which does not exist yet (there are mnist5k, digits and cifar10), so a training run
stops naming the valid datasets. Meant for accelerators (TPU v3-8: ~2.2 steps/s at batch 64);
see launch/ for pods.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.image_size = 256
    config.data.channels = 3
    config.data.random_flip = True
    config.model.out_ch = 3
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.0
    config.diffusion.var_type = 'fixedsmall'
    config.optim.learning_rate = 2e-5
    config.training.batch_size = 64
    # Pure data parallelism: compiled for a TPU v3-8 (16 GiB per core) the step needs 8.1 GiB
    # per core and one all-reduce of the gradient (455 MB); under FSDP (parallel.FSDP_RULES,
    # the lever for smaller chips or larger models) 8.0 GiB but 3.2 GB of all-gathers,
    # all-reduces and all-to-alls, and a slower estimate (286 vs 278 ms; docs/tpu.md).
    config.training.param_sharding = ()
    config.training.sample_every = 50_000
    config.sampling.num_samples = 128
    config.sampling.batch_size = 64
    return config

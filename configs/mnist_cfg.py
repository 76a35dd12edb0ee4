"""A class-conditional U-Net on MNIST-5k for classifier-free guidance (Ho & Salimans 2022), with
the main job's network and budget (configs/mnist.py) plus a label embedding:

    python -m diffusion_jax.main --config=configs/mnist_cfg.py --workdir=runs/mnist_cfg
    python -m diffusion_jax.main --config=configs/mnist_cfg.py --workdir=runs/mnist_cfg \
        --mode=sample --config.sampling.guidance_scale=3 --config.sampling.labels=7

Labels are dropped to the null label with probability 0.1 in training (the paper's p_uncond),
so one network gives ε(x, y) and ε(x, ∅). Sampling guides with w = 1 by default, ten samples
of each digit (labels cycle); w = 0 is the plain conditional model. The same run serves as the
base model of classifier guidance (configs/mnist_classifier.py): with sampling.guidance=
classifier the U-Net is still given the labels.
"""

from configs import mnist


def get_config():
    config = mnist.get_config()
    config.model.num_classes = 10
    config.training.label_dropout = 0.1
    config.sampling.guidance = 'classifier_free'
    config.sampling.guidance_scale = 1.0
    config.sampling.labels = 'cycle'
    config.sampling.num_samples = 100  # Guided sampling evaluates the network twice per step.
    config.sampling.batch_size = 100
    return config

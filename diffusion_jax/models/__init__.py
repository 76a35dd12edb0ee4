"""Networks: the DDPM U-Net and the noise-aware classifier built on its encoder."""

from diffusion_jax.models.classifier import NoisyClassifier
from diffusion_jax.models.unet import UNet

__all__ = ['NoisyClassifier', 'UNet']

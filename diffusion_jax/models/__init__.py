"""Networks: the DDPM U-Net."""

from diffusion_jax.models.unet import UNet

__all__ = ['UNet']

"""Samplers. Each one is a jitted `lax.scan` over reverse steps."""

from diffusion_jax.sampling.ancestral import ancestral_sample, reverse_steps, snapshot_timesteps

__all__ = ['ancestral_sample', 'reverse_steps', 'snapshot_timesteps']

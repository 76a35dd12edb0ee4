"""Samplers. Each one is a jitted `lax.scan` over reverse steps."""

from diffusion_jax.sampling.ancestral import (ancestral_sample, reverse_chain, reverse_steps,
                                              snapshot_timesteps)
from diffusion_jax.sampling.ddim import ddim_encode, ddim_sample, ddim_steps, timestep_sequence
from diffusion_jax.sampling.interpolation import interpolate

__all__ = ['ancestral_sample', 'ddim_encode', 'ddim_sample', 'ddim_steps', 'interpolate',
           'reverse_chain', 'reverse_steps', 'snapshot_timesteps', 'timestep_sequence']

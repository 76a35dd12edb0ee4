"""Samplers. Each one is a jitted `lax.scan` over reverse steps (the ODE sampler: one
diffrax solve); `configured` picks the one a config names."""

from diffusion_jax.sampling.ancestral import (ancestral_sample, reverse_chain, reverse_steps,
                                              snapshot_timesteps)
from diffusion_jax.sampling.configured import SAMPLERS, check_sampling_config, sample_batch
from diffusion_jax.sampling.ddim import ddim_encode, ddim_sample, ddim_steps, timestep_sequence
from diffusion_jax.sampling.interpolation import interpolate
from diffusion_jax.sampling.langevin import annealed_langevin_sample
from diffusion_jax.sampling.ode import ode_encode, ode_sample, ode_sample_from
from diffusion_jax.sampling.pc import pc_sample

__all__ = ['SAMPLERS', 'ancestral_sample', 'annealed_langevin_sample', 'check_sampling_config',
           'ddim_encode', 'ddim_sample', 'ddim_steps', 'interpolate', 'ode_encode', 'ode_sample',
           'ode_sample_from', 'pc_sample', 'reverse_chain', 'reverse_steps', 'sample_batch',
           'snapshot_timesteps', 'timestep_sequence']

"""Samplers. Each one is a jitted `lax.scan` over reverse steps (the ODE sampler: one
diffrax solve); `configured` picks the one a config names, `guidance` conditions them on a
class, `editing` edits images with them (SDEdit)."""

from diffusion_jax.sampling.ancestral import (ancestral_sample, reverse_chain, reverse_steps,
                                              snapshot_timesteps)
from diffusion_jax.sampling.configured import SAMPLERS, check_sampling_config, sample_batch
from diffusion_jax.sampling.ddim import ddim_encode, ddim_sample, ddim_steps, timestep_sequence
from diffusion_jax.sampling.guidance import (GUIDANCE, make_sampling_model,
                                             sample_labels)
from diffusion_jax.sampling.interpolation import interpolate
from diffusion_jax.sampling.langevin import annealed_langevin_sample
from diffusion_jax.sampling.ode import ode_encode, ode_sample, ode_sample_from
from diffusion_jax.sampling.pc import pc_sample
from diffusion_jax.sampling.editing import blocky_strokes, sdedit

__all__ = ['GUIDANCE', 'SAMPLERS', 'ancestral_sample', 'annealed_langevin_sample',
           'blocky_strokes', 'check_sampling_config', 'ddim_encode', 'ddim_sample', 'ddim_steps',
           'interpolate', 'make_sampling_model', 'ode_encode', 'ode_sample', 'ode_sample_from',
           'pc_sample', 'reverse_chain', 'reverse_steps', 'sample_batch', 'sample_labels',
           'sdedit', 'snapshot_timesteps', 'timestep_sequence']

"""The sampler a config's `sampling` block names, for the process of its `diffusion` block.

  ancestral  DDPM Algorithm 2 over all T steps                 (process ddpm)
  ddim       DDIM on a timestep subsequence                    (process ddpm)
  pc         predictor-corrector on the reverse SDE            (process vp | subvp | ve)
  ode        probability flow ODE with diffrax                 (process vp | subvp | ve)
  langevin   annealed Langevin dynamics                        (process ncsn)
"""

from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import errors
from diffusion_jax import sde as sde_lib
from diffusion_jax.sampling import ancestral
from diffusion_jax.sampling import ddim
from diffusion_jax.sampling import guidance
from diffusion_jax.sampling import langevin
from diffusion_jax.sampling import ode
from diffusion_jax.sampling import pc

SAMPLERS = {'ancestral': diffusion_lib.Diffusion, 'ddim': diffusion_lib.Diffusion,
            'pc': sde_lib.SDE, 'ode': sde_lib.SDE, 'langevin': sde_lib.NCSN}


def check_sampling_config(sampling_config, process):
    """Fails early (before training) on a sampler setting that would fail after it."""
    name = sampling_config.sampler
    if name not in SAMPLERS:
        raise errors.ConfigError(f'Unknown sampling.sampler {name!r}; valid: {", ".join(SAMPLERS)}')
    if not isinstance(process, SAMPLERS[name]):
        valid = [s for s, kind in SAMPLERS.items() if isinstance(process, kind)]
        raise errors.ConfigError(f'sampling.sampler={name!r} does not apply to a '
                                 f'{type(process).__name__} process; valid: {", ".join(valid)}')
    if name == 'ddim':
        if not 0.0 <= sampling_config.eta <= 1.0:
            raise errors.ConfigError(f'sampling.eta must be in [0, 1], got {sampling_config.eta}')
        ddim.timestep_sequence(process.num_timesteps, sampling_config.num_steps,
                               sampling_config.timestep_spacing)
    if name == 'pc':
        if sampling_config.predictor not in pc.PREDICTORS:
            raise errors.ConfigError(
                f'Unknown sampling.predictor {sampling_config.predictor!r}; valid: '
                f'{", ".join(pc.PREDICTORS)}')
        if sampling_config.corrector not in pc.CORRECTORS:
            raise errors.ConfigError(
                f'Unknown sampling.corrector {sampling_config.corrector!r}; valid: '
                f'{", ".join(pc.CORRECTORS)}')
        if sampling_config.predictor == 'ancestral' and isinstance(process, sde_lib.SubVPSDE):
            raise errors.ConfigError(
                'sampling.predictor=ancestral needs a VP or VE SDE, not sub-VP')
    if sampling_config.guidance not in guidance.GUIDANCE:
        raise errors.ConfigError(f'Unknown sampling.guidance {sampling_config.guidance!r}; valid: '
                                 f'{", ".join(guidance.GUIDANCE)}')
    if sampling_config.guidance != 'none' and (
            process.output_groups != 1 or getattr(process, 'mean_type', 'eps') != 'eps'):
        raise errors.ConfigError(
            'guidance needs an ε-network with a fixed variance (mean_type eps, '
            'var_type fixedlarge or fixedsmall)')
    if sampling_config.guidance == 'classifier':
        if name not in ('ancestral', 'ddim'):
            raise errors.ConfigError(
                f'classifier guidance runs with sampling.sampler ancestral or ddim, '
                f'not {name!r} (classifier-free guidance works with every sampler)')
        if not sampling_config.classifier_workdir:
            raise errors.ConfigError(
                'sampling.guidance=classifier needs sampling.classifier_workdir: '
                'the workdir of a trained configs/*_classifier.py run')
    if name == 'ode' and sampling_config.ode_solver not in ode.SOLVERS:
        raise errors.ConfigError(
            f'Unknown sampling.ode_solver {sampling_config.ode_solver!r}; valid: '
            f'{", ".join(ode.SOLVERS)}')


def ddim_chunk_size(sampling_config, num_timesteps):
    """DDIM steps per jitted call: as many x̂_0 snapshots as the ancestral sampler's chunks of
    `chunk_size` would give over all T steps."""
    return -(-sampling_config.num_steps * sampling_config.chunk_size // num_timesteps)


def sample_batch(sampling_config, model_apply, params, process, rng, shape, *, progress=True,
                 sharding=None, guidance_fn=None):
    """One batch from the configured sampler: (x_0, snapshots of x̂_0 along the way), float32.

    `guidance_fn`: classifier guidance for the ancestral and DDIM samplers (`guidance`).
    """
    check_sampling_config(sampling_config, process)
    s = sampling_config
    if s.sampler == 'ancestral':
        return ancestral.ancestral_sample(
            model_apply, params, process, rng, shape, clip_denoised=s.clip_denoised,
            chunk_size=s.chunk_size, progress=progress, sharding=sharding,
            guidance_fn=guidance_fn)
    if s.sampler == 'ddim':
        return ddim.ddim_sample(
            model_apply, params, process, rng, shape, num_steps=s.num_steps, eta=s.eta,
            spacing=s.timestep_spacing, clip_denoised=s.clip_denoised,
            chunk_size=ddim_chunk_size(s, process.num_timesteps),
            progress=progress, sharding=sharding, guidance_fn=guidance_fn)
    if s.sampler == 'pc':
        return pc.pc_sample(
            model_apply, params, process, rng, shape, predictor=s.predictor,
            corrector=s.corrector, n_corrector=s.n_corrector, snr=s.snr, denoise=s.denoise,
            chunk_size=s.chunk_size, progress=progress, sharding=sharding)
    if s.sampler == 'ode':
        x, _ = ode.ode_sample(model_apply, params, process, rng, shape, rtol=s.ode_rtol,
                              atol=s.ode_atol, solver=s.ode_solver, denoise=s.denoise,
                              sharding=sharding)
        return x, x[None]
    return langevin.annealed_langevin_sample(
        model_apply, params, process, rng, shape, n_steps_each=s.n_steps_each,
        step_lr=s.step_lr, denoise=s.denoise, chunk_size=s.chunk_size, progress=progress,
        sharding=sharding)

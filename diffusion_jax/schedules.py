"""Beta schedules, always built in float64 NumPy.

The tables derived from them (see `diffusion.Diffusion.create`) are computed in float64 too and
only then stored as float32: 1 - alphas_cumprod reaches ~1e-4 at t = 0 and cumulative products in
float32 would lose digits the sampler and the bound depend on.
"""

import math

import numpy as np

from diffusion_jax import errors

BETA_SCHEDULES = ('linear', 'cosine', 'quad', 'const', 'jsd', 'warmup10', 'warmup50')


def _warmup_betas(beta_start, beta_end, num_timesteps, warmup_frac):
    betas = beta_end * np.ones(num_timesteps, dtype=np.float64)
    warmup_time = int(num_timesteps * warmup_frac)
    betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
    return betas


def _cosine_betas(num_timesteps, s=0.008, max_beta=0.999):
    """Nichol & Dhariwal (2021), eq. 17: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2)."""
    def alpha_bar(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
         for i in range(num_timesteps)], dtype=np.float64)


def get_beta_schedule(name, num_timesteps, *, beta_start=1e-4, beta_end=0.02):
    """Returns the betas of a named schedule.

    Args:
      name: one of `BETA_SCHEDULES`. 'linear' (1e-4 .. 0.02) is the paper's (Ho et al. §4).
      num_timesteps: T.
      beta_start, beta_end: endpoints for linear / quad / warmup / const (const uses beta_end).
        Ignored by 'cosine' and 'jsd'.

    Returns:
      float64 array of shape [num_timesteps], every entry in (0, 1].
    """
    if name == 'linear':
        betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    elif name == 'quad':
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps,
                            dtype=np.float64) ** 2
    elif name == 'const':
        betas = beta_end * np.ones(num_timesteps, dtype=np.float64)
    elif name == 'jsd':  # 1/T, 1/(T-1), ..., 1
        betas = 1.0 / np.linspace(num_timesteps, 1, num_timesteps, dtype=np.float64)
    elif name == 'warmup10':
        betas = _warmup_betas(beta_start, beta_end, num_timesteps, 0.1)
    elif name == 'warmup50':
        betas = _warmup_betas(beta_start, beta_end, num_timesteps, 0.5)
    elif name == 'cosine':
        betas = _cosine_betas(num_timesteps)
    else:
        raise errors.ConfigError(
            f'Unknown beta schedule {name!r}; valid names: {", ".join(BETA_SCHEDULES)}')
    assert betas.shape == (num_timesteps,)
    return betas

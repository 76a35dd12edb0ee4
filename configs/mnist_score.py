"""Score-based models on MNIST-5k with the main job's network and budget (configs/mnist.py):

    python -m diffusion_jax.main --config=configs/mnist_score.py:vp --workdir=runs/mnist_vp
    python -m diffusion_jax.main --config=configs/mnist_score.py:vp --workdir=runs/mnist_vp \
        --mode=eval

The argument after ':' is the process: vp | subvp | ve (Song et al. 2021) or ncsn (Song & Ermon
2019). Noise levels are in the units of our [-1, 1] data, twice those of papers on [0, 1] data:
VE's σ_max = 32 is the largest distance between two MNIST-5k training images (Song & Ermon 2020,
technique 1; measured 31.7), σ_min = 0.02 is the papers' 0.01. NCSN keeps its paper's σ_1 = 1,
σ_10 = 0.01 (so 2 and 0.02) and α_L / σ_L² = 0.2 (ε = 2e-5 at σ_L = 0.01 becomes 8e-5).
Samplers follow Song et al.'s configs: Euler-Maruyama for VP and sub-VP, reverse diffusion +
Langevin (snr 0.16) for VE, annealed Langevin (100 steps per level) for NCSN.
"""

from configs import mnist


def get_config(process='vp'):
    config = mnist.get_config()
    return apply_process(config, process)


def apply_process(config, process):
    """The process's diffusion and sampling fields on top of a DDPM config."""
    d, s = config.diffusion, config.sampling
    d.process = process
    s.sampler = {'vp': 'pc', 'subvp': 'pc', 've': 'pc', 'ncsn': 'langevin'}[process]
    if process in ('vp', 'subvp'):
        d.num_timesteps = 1000
        s.predictor, s.corrector = 'euler_maruyama', 'none'
    elif process == 've':
        d.num_timesteps = 1000
        d.sigma_min, d.sigma_max = 0.02, 32.0
        s.predictor, s.corrector, s.snr = 'reverse_diffusion', 'langevin', 0.16
    else:
        d.num_timesteps = 10  # L noise levels
        d.sigma_min, d.sigma_max = 0.02, 2.0
        s.n_steps_each, s.step_lr = 100, 8e-5
    return config

"""Score-based generative models: the SDEs of Song et al. (ICLR 2021) and the noise levels of
NCSN (Song & Ermon, NeurIPS 2019), as frozen (hashable, jit-static) dataclasses.

Equation numbers are Song et al. 2021 ("SDE") and Song & Ermon 2019 ("NCSN"). Time runs over
[0, T] with T = 1; `t` is a float vector [B]. Every model here is an ε-network: the U-Net sees
the noisy x and a time label in [0, 999] (the DDPM U-Net's timestep range) and predicts the
standard-normal noise z of x_t = mean(t) x_0 + std(t) z. The score is then

  s_θ(x, t) = -ε_θ(x, t) / std(t),                                                 (1)

and the denoising score matching loss weighted by λ(t) = std(t)² (SDE eq. 7, NCSN eq. 5) is
exactly ‖ε_θ - z‖². This is NCSNv2's "scale the output by 1/σ", which both later papers use.

The processes share the interface the training loss needs: `sample_t`, `q_sample`,
`time_label` and `training_losses`, like `diffusion.Diffusion`.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import mean_flat

SDE_NAMES = ('vp', 'subvp', 've')


def broadcast_batch(v, x):
    """A [B] vector reshaped to broadcast against x [B, ...]."""
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def gaussian_log_prob(z, std=1.0):
    """log N(z; 0, std² I) summed over every axis but the batch axis."""
    d = math.prod(z.shape[1:])
    sq = jnp.sum(jnp.square(z).reshape(z.shape[0], -1), axis=-1)
    return -0.5 * d * jnp.log(2 * jnp.pi * std ** 2) - 0.5 * sq / std ** 2


@dataclasses.dataclass(frozen=True)
class SDE:
    """dx = f(x, t) dt + g(t) dw on t ∈ [0, 1] (SDE eq. 5), discretized in N steps.

    Subclasses define `sde`, `marginal_prob`, `prior_std` and `discretize`.

    Attributes:
      N: discretization steps of the samplers (and of the VP/VE discrete chains).
      train_eps: smallest training time (t ~ U[train_eps, 1]); the score diverges at t = 0.
      sample_eps: time at which samplers and the likelihood ODE stop.
      likelihood_weighting: λ(t) = g(t)² (SDE Theorem 1) instead of std(t)².
    """
    N: int = 1000
    train_eps: float = 1e-5
    sample_eps: float = 1e-3
    likelihood_weighting: bool = False

    T = 1.0
    output_groups = 1  # The network outputs ε only.

    # -- what the training loss needs (the `Diffusion` interface) ---------------------------
    def sample_t(self, rng, batch_size):
        return jax.random.uniform(rng, (batch_size,), jnp.float32, self.train_eps, self.T)

    def q_sample(self, x0, t, noise):
        mean, std = self.marginal_prob(x0, t)
        return mean + broadcast_batch(std, x0) * noise

    def time_label(self, t):
        """The U-Net's time input: 999 t (for VE, log σ is linear in t, so this is log σ
        rescaled)."""
        return t * 999.0

    def training_losses(self, model_output, x0, x_t, t, noise):
        """λ(t) ‖s_θ - ∇ log p_0t(x_t | x_0)‖² averaged over pixels (SDE eq. 7); with (1)
        and ∇ log p_0t = -z / std this is (λ / std²) mean ‖ε_θ - z‖²."""
        del x_t
        loss = mean_flat(jnp.square(model_output - noise))
        if self.likelihood_weighting:
            _, g = self.sde(x0, t)
            _, std = self.marginal_prob(x0, t)
            loss = loss * jnp.square(g / std)
        return loss

    # -- what the samplers need ---------------------------------------------------------------
    def score_from_output(self, model_output, x, t):
        """Eq. (1) of this module's docstring."""
        return -model_output / broadcast_batch(self.marginal_prob(x, t)[1], x)

    def prior_sampling(self, rng, shape):
        return self.prior_std * jax.random.normal(rng, shape, jnp.float32)

    def prior_logp(self, z):
        return gaussian_log_prob(z, self.prior_std)

    def reverse(self, score, x, t, probability_flow=False):
        """Drift and diffusion of the reverse-time SDE (SDE eq. 6) or, with
        `probability_flow`, of the probability flow ODE (SDE eq. 13): f - (1 or ½) g² s."""
        drift, g = self.sde(x, t)
        g2 = broadcast_batch(jnp.square(g), x)
        if probability_flow:
            return drift - 0.5 * g2 * score, jnp.zeros_like(g)
        return drift - g2 * score, g

    def discretize(self, x, t):
        """f_i, G_i of x_{i+1} = x_i + f_i + G_i z_i (SDE eq. 45); Euler-Maruyama by default."""
        drift, g = self.sde(x, t)
        dt = 1.0 / self.N
        return drift * dt, g * math.sqrt(dt)

    def timesteps(self):
        """The N sampler times from T down to sample_eps (as in Song et al.'s code)."""
        return jnp.linspace(self.T, self.sample_eps, self.N)

    def discrete_index(self, t):
        """Index of the discrete chain (VP: β_i, VE: σ_i) at time t: N - 1 - k for the k-th
        sampler time (Song et al.'s code truncates t (N - 1) / T, which gives the same indices
        exactly; inverting the time grid keeps them in float32, where t (N - 1) falls a hair
        below an integer)."""
        k = jnp.round((self.T - t) * (self.N - 1) / (self.T - self.sample_eps))
        return (self.N - 1 - k).astype(jnp.int32)

    def langevin_alpha(self, t):
        """α_i in the Langevin corrector's step 2 α (r ‖z‖ / ‖s‖)² (SDE Algorithms 4-5)."""
        return jnp.ones_like(t)


@dataclasses.dataclass(frozen=True)
class VPSDE(SDE):
    """Variance preserving (SDE eq. 11): dx = -½ β(t) x dt + sqrt(β(t)) dw, β linear in t.
    Its N-step discretization β_i = β(i / (N - 1)) / N is DDPM's linear schedule (eq. 10-11)."""
    beta_min: float = 0.1
    beta_max: float = 20.0

    prior_std = 1.0

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def discrete_betas(self):
        return jnp.asarray(np.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N),
                           jnp.float32)

    def sde(self, x, t):
        beta = self.beta(t)
        return -0.5 * broadcast_batch(beta, x) * x, jnp.sqrt(beta)

    def log_mean_coeff(self, t):
        """log of exp(-½ ∫_0^t β(s) ds) (SDE eq. 29)."""
        return -0.25 * jnp.square(t) * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def marginal_prob(self, x0, t):
        log_coeff = self.log_mean_coeff(t)
        return broadcast_batch(jnp.exp(log_coeff), x0) * x0, jnp.sqrt(-jnp.expm1(2.0 * log_coeff))

    def discretize(self, x, t):
        """DDPM's chain: x_i = sqrt(1 - β_i) x_{i-1} + sqrt(β_i) z (SDE eq. 10)."""
        beta = self.discrete_betas()[self.discrete_index(t)]
        return broadcast_batch(jnp.sqrt(1.0 - beta) - 1.0, x) * x, jnp.sqrt(beta)

    def langevin_alpha(self, t):
        return 1.0 - self.discrete_betas()[self.discrete_index(t)]


@dataclasses.dataclass(frozen=True)
class SubVPSDE(VPSDE):
    """sub-VP (SDE eq. 12): the VP drift with g(t)² = β(t) (1 - exp(-2 ∫_0^t β)), whose
    marginal variance (1 - exp(-∫β))² stays below the VP one."""

    def sde(self, x, t):
        drift, _ = super().sde(x, t)
        return drift, jnp.sqrt(self.beta(t) * -jnp.expm1(4.0 * self.log_mean_coeff(t)))

    def marginal_prob(self, x0, t):
        log_coeff = self.log_mean_coeff(t)
        return broadcast_batch(jnp.exp(log_coeff), x0) * x0, -jnp.expm1(2.0 * log_coeff)

    discretize = SDE.discretize
    langevin_alpha = SDE.langevin_alpha


@dataclasses.dataclass(frozen=True)
class VESDE(SDE):
    """Variance exploding (SDE eq. 9): dx = sqrt(d σ(t)²/dt) dw, σ(t) = σ_min (σ_max/σ_min)^t.
    Its discretization is SMLD/NCSN's geometric σ_i. As in Song et al., x(0) counts as data
    perturbed with σ_min, so the perturbation kernel's std is σ(t)."""
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    sample_eps: float = 1e-5

    @property
    def prior_std(self):
        return self.sigma_max

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def discrete_sigmas(self):
        return jnp.asarray(self._sigmas64(), jnp.float32)

    def _sigmas64(self):
        return np.exp(np.linspace(math.log(self.sigma_min), math.log(self.sigma_max), self.N))

    def discrete_steps(self, t):
        """σ_i, σ_{i-1} (0 for i = 0) and σ_i² - σ_{i-1}², the last from a float64 table: in
        float32 the difference of neighbouring squares loses ~5 digits."""
        sigmas = self._sigmas64()
        increments = np.diff(np.square(sigmas), prepend=0.0)
        prev = np.concatenate([[0.0], sigmas[:-1]])
        i = self.discrete_index(t)
        return tuple(jnp.asarray(a, jnp.float32)[i] for a in (sigmas, prev, increments))

    def sde(self, x, t):
        g = self.sigma(t) * math.sqrt(2.0 * math.log(self.sigma_max / self.sigma_min))
        return jnp.zeros_like(x), g

    def marginal_prob(self, x0, t):
        return x0, self.sigma(t)

    def discretize(self, x, t):
        """SMLD's chain: x_i = x_{i-1} + sqrt(σ_i² - σ_{i-1}²) z (SDE eq. 8), σ_{-1} = 0."""
        _, _, increment = self.discrete_steps(t)
        return jnp.zeros_like(x), jnp.sqrt(increment)


@dataclasses.dataclass(frozen=True)
class NCSN:
    """Noise conditional score network levels (NCSN §4.2): σ_1 > ... > σ_L geometric; level
    index i = 0 .. L-1 is σ_{i+1}. Training draws i uniformly (NCSN eq. 6)."""
    num_scales: int = 10
    sigma_min: float = 0.02
    sigma_max: float = 2.0

    output_groups = 1

    def sigmas(self):
        """float64 on the host: σ_1 ... σ_L."""
        return np.exp(np.linspace(np.log(self.sigma_max), np.log(self.sigma_min),
                                  self.num_scales))

    def sample_t(self, rng, batch_size):
        return jax.random.randint(rng, (batch_size,), 0, self.num_scales, jnp.int32)

    def sigma(self, i):
        return jnp.asarray(self.sigmas(), jnp.float32)[i]

    def q_sample(self, x0, i, noise):
        return x0 + broadcast_batch(self.sigma(i), x0) * noise

    def time_label(self, i):
        """999 (1 - i / (L-1)): the VE SDE's label of the same σ (log σ rescaled to [0, 999])."""
        return 999.0 * (1.0 - i.astype(jnp.float32) / max(self.num_scales - 1, 1))

    def training_losses(self, model_output, x0, x_t, i, noise):
        """½ σ² ‖s_θ + z / σ‖² (NCSN eq. 5 with λ(σ) = σ²) = ½ ‖ε_θ - z‖², per pixel."""
        del x0, x_t, i
        return 0.5 * mean_flat(jnp.square(model_output - noise))

    def score_from_output(self, model_output, x, i):
        return -model_output / broadcast_batch(self.sigma(i), x)


def get_sde(name, *, num_scales, beta_min=0.1, beta_max=20.0, sigma_min=0.01, sigma_max=50.0,
            train_eps=1e-5, sample_eps=None, likelihood_weighting=False):
    """The SDE called `name` (vp | subvp | ve); `sample_eps=None` keeps the SDE's default
    (1e-3 for VP and sub-VP, 1e-5 for VE, as in Song et al.)."""
    common = dict(N=num_scales, train_eps=train_eps, likelihood_weighting=likelihood_weighting)
    if sample_eps is not None:
        common['sample_eps'] = sample_eps
    if name == 'vp':
        return VPSDE(beta_min=beta_min, beta_max=beta_max, **common)
    if name == 'subvp':
        return SubVPSDE(beta_min=beta_min, beta_max=beta_max, **common)
    if name == 've':
        return VESDE(sigma_min=sigma_min, sigma_max=sigma_max, **common)
    raise ValueError(f'Unknown SDE {name!r}; valid: {", ".join(SDE_NAMES)}')


def score(model_apply, params, process, x, t):
    """s_θ(x, t) of an ε-network `model_apply(params, x, label)` under an SDE or NCSN."""
    return process.score_from_output(model_apply(params, x, process.time_label(t)), x, t)

"""An independent float64 NumPy reference of score-based model math, for the tests only.

Written from the papers, not from `diffusion_jax`: Song et al. (ICLR 2021) eqs. 9-13 (VE, VP,
sub-VP SDEs and the probability flow ODE), eqs. 45-47 (their discretizations) and Algorithms 2-5
(predictors, the Langevin corrector); Song & Ermon (2019) eqs. 4-6 (annealed Langevin dynamics,
the σ²-weighted denoising score matching loss). Marginals are not written in closed form here:
the tests integrate the moment ODEs of the SDE (Särkkä & Solin eq. 5.51) numerically instead.

Arrays are float64 with the batch first; t is a float vector [B].
"""

import math

import numpy as np
from scipy import integrate


def _b(v, x):
    return np.reshape(v, np.shape(v) + (1,) * (x.ndim - np.ndim(v)))


class SDE:
    """f(x, t) = a(t) x (linear drift) and g(t) of the three SDEs, with their priors."""

    def __init__(self, name, beta_min=0.1, beta_max=20.0, sigma_min=0.01, sigma_max=50.0, N=1000):
        self.name, self.N = name, N
        self.beta_min, self.beta_max = beta_min, beta_max
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def drift_coeff(self, t):
        """a(t) in f = a(t) x: -β(t)/2 for VP and sub-VP (eqs. 11-12), 0 for VE (eq. 9)."""
        return np.zeros_like(t) if self.name == 've' else -0.5 * self.beta(t)

    def g(self, t):
        if self.name == 'vp':
            return np.sqrt(self.beta(t))
        if self.name == 'subvp':  # g² = β(t) (1 - exp(-2 ∫_0^t β(s) ds))
            integral = self.beta_min * t + 0.5 * t * t * (self.beta_max - self.beta_min)
            return np.sqrt(self.beta(t) * (1.0 - np.exp(-2.0 * integral)))
        # VE: g = sqrt(d σ²(t) / dt) with σ(t) = σ_min (σ_max / σ_min)^t.
        sigma = self.sigma_min * (self.sigma_max / self.sigma_min) ** t
        return sigma * np.sqrt(2.0 * math.log(self.sigma_max / self.sigma_min))

    def moments(self, t):
        """(m(t), s(t)) of x(t) | x(0) = x_0 ~ m x_0 + s z, from the moment ODEs
        dm/dt = a m, dv/dt = 2 a v + g² integrated with an adaptive solver. VE starts from
        v(0) = σ_min² (x(0) is data with σ_min noise, as Song et al. define it)."""
        v0 = self.sigma_min ** 2 if self.name == 've' else 0.0

        def rhs(s, y):
            a = self.drift_coeff(np.float64(s))
            return [a * y[0], 2 * a * y[1] + self.g(np.float64(s)) ** 2]

        sol = integrate.solve_ivp(rhs, (0.0, float(t)), [1.0, v0], rtol=1e-10, atol=1e-12)
        m, v = sol.y[:, -1]
        return m, math.sqrt(v)

    def prior_std(self):
        return self.sigma_max if self.name == 've' else 1.0

    def discrete(self):
        """β_i (VP, eq. 47's chain: β_i = β(i / (N-1)) / N) or σ_i (VE, geometric)."""
        i = np.arange(self.N, dtype=np.float64)
        if self.name == 've':
            return self.sigma_min * (self.sigma_max / self.sigma_min) ** (i / (self.N - 1))
        return (self.beta_min + (self.beta_max - self.beta_min) * i / (self.N - 1)) / self.N


def reverse_drift(sde, x, t, score, probability_flow=False):
    """f - g² s (reverse SDE, eq. 6) or f - ½ g² s (probability flow, eq. 13)."""
    g2 = _b(sde.g(t) ** 2, x)
    return _b(sde.drift_coeff(t), x) * x - (0.5 if probability_flow else 1.0) * g2 * score


def index(sde, t):
    """Song et al.'s discrete index: t (N - 1) / T truncated (exact in float64 on the sampler's
    time grid, whose k-th time gives N - 1 - k)."""
    return np.floor(t * (sde.N - 1)).astype(int)


def euler_maruyama(sde, x, t, score, z):
    dt = 1.0 / sde.N
    mean = x - reverse_drift(sde, x, t, score) * dt
    return mean + _b(sde.g(t), x) * math.sqrt(dt) * z, mean


def reverse_diffusion(sde, x, t, score, z):
    """x_i = x_{i+1} - f_{i+1} + G² s + G z with the forward chain x_{i+1} = x_i + f_i + G_i z
    (eq. 46): the discrete chains of eq. 45 (VE) and 47 (VP); Euler for sub-VP."""
    i = index(sde, t)
    if sde.name == 'vp':
        beta = sde.discrete()[i]
        f, G = _b(np.sqrt(1.0 - beta) - 1.0, x) * x, np.sqrt(beta)
    elif sde.name == 've':
        sigmas = sde.discrete()
        prev = np.where(i > 0, sigmas[np.maximum(i - 1, 0)], 0.0)
        f, G = np.zeros_like(x), np.sqrt(sigmas[i] ** 2 - prev ** 2)
    else:
        f, G = _b(sde.drift_coeff(t), x) * x / sde.N, sde.g(t) / math.sqrt(sde.N)
    mean = x - f + _b(G ** 2, x) * score
    return mean + _b(G, x) * z, mean


def ancestral(sde, x, t, score, z):
    """Ancestral sampling of the discrete chains (Song et al. App. F, eq. 47 for VP = DDPM's
    Algorithm 2 with σ_t² = β_t; the SMLD posterior for VE)."""
    i = index(sde, t)
    if sde.name == 'vp':
        beta = sde.discrete()[i]
        mean = (x + _b(beta, x) * score) / _b(np.sqrt(1.0 - beta), x)
        return mean + _b(np.sqrt(beta), x) * z, mean
    sigmas = sde.discrete()
    prev = np.where(i > 0, sigmas[np.maximum(i - 1, 0)], 0.0)
    mean = x + _b(sigmas[i] ** 2 - prev ** 2, x) * score
    std = np.sqrt(prev ** 2 * (sigmas[i] ** 2 - prev ** 2) / sigmas[i] ** 2)
    return mean + _b(std, x) * z, mean


def langevin_corrector(sde, x, t, score, z, snr):
    """Algorithms 4-5 with the norms averaged over the batch (Song et al.'s code)."""
    def norm(v):
        return np.mean(np.sqrt(np.sum(v.reshape(len(v), -1) ** 2, axis=1)))

    alpha = 1.0 - sde.discrete()[index(sde, t)] if sde.name == 'vp' else np.ones_like(t)
    eps = 2.0 * alpha * (snr * norm(z) / norm(score)) ** 2
    mean = x + _b(eps, x) * score
    return mean + _b(np.sqrt(2.0 * eps), x) * z, mean


def dsm_loss(sde, score, x0, t, z, likelihood_weighting=False):
    """λ(t) ‖s - ∇ log p_0t(x_t | x_0)‖² per pixel (eq. 7), λ = s(t)² or g(t)²."""
    out = []
    for b in range(len(t)):
        m, s = sde.moments(t[b])
        x_t = m * x0[b] + s * z[b]
        target = -(x_t - m * x0[b]) / s ** 2
        lam = sde.g(t[b]) ** 2 if likelihood_weighting else s ** 2
        out.append(lam * np.mean((score[b] - target) ** 2))
    return np.asarray(out)


def ncsn_sigmas(num_scales, sigma_min, sigma_max):
    """σ_1 > ... > σ_L, a geometric sequence (NCSN §4.2)."""
    ratio = (sigma_min / sigma_max) ** (1.0 / (num_scales - 1))
    return sigma_max * ratio ** np.arange(num_scales)


def annealed_langevin(score_fn, x, sigmas, n_steps_each, step_lr, noises):
    """NCSN Algorithm 1; score_fn(x, level) and noises[k] for step k = level n + j."""
    k = 0
    for level, sigma in enumerate(sigmas):
        alpha = step_lr * sigma ** 2 / sigmas[-1] ** 2
        for _ in range(n_steps_each):
            x = x + 0.5 * alpha * score_fn(x, level) + math.sqrt(alpha) * noises[k]
            k += 1
    return x

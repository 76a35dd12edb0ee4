"""An independent float64 NumPy reference of the DDPM process math, for the tests only.

Written from the equations, not from `diffusion_jax`: Ho, Jain & Abbeel (2020) eqs. 4-7 and 11-14
(the variational bound eq. 5, the discretized decoder eq. 13), the beta schedules of the original
diffusion_tf code, Nichol & Dhariwal (2021, "IDDPM") eqs. 15 and 17 for the learned-range
variance and the cosine schedule, Song, Meng & Ermon (2021, "DDIM") eqs. 12 and 16, and the
dual-output parameterization of Benny & Wolf (2022).

Time is 0-indexed: index i is the paper's t = i + 1. Every function takes and returns float64
arrays; images are NHWC, `t` an integer vector of length B. Per-element functions are kept separate
from the pixel means so the tests can differentiate them element by element.
"""

import math

import numpy as np

LN2 = math.log(2.0)

# -------------------------------------------------------------------------------------------------
# Beta schedules
# -------------------------------------------------------------------------------------------------


def _ramp(first, last, n):
    """n points evenly spaced from `first` to `last` inclusive (explicit formula, no linspace)."""
    if n == 1:
        return np.array([first], dtype=np.float64)
    return np.array([first + (last - first) * (i / (n - 1)) for i in range(n)], dtype=np.float64)


def _cosine_f(u, num_timesteps, s=0.008):
    """IDDPM eq. 17: f(t) = cos^2(((t / T + s) / (1 + s)) * pi / 2)."""
    return math.cos((u / num_timesteps + s) / (1.0 + s) * (math.pi / 2.0)) ** 2


def cosine_alpha_bar(t, num_timesteps):
    """IDDPM eq. 17: alpha_bar_t = f(t) / f(0), paper time t in 0..T."""
    return _cosine_f(t, num_timesteps) / _cosine_f(0, num_timesteps)


def beta_schedule(name, num_timesteps, beta_start=1e-4, beta_end=0.02):
    """The schedules of diffusion_tf's get_beta_schedule, plus IDDPM's cosine."""
    n = num_timesteps
    if name == 'linear':
        return _ramp(beta_start, beta_end, n)
    if name == 'quad':  # linear in sqrt(beta)
        return _ramp(math.sqrt(beta_start), math.sqrt(beta_end), n) ** 2
    if name == 'const':
        return np.full(n, beta_end, dtype=np.float64)
    if name == 'jsd':  # 1/T, 1/(T-1), ..., 1/1
        return np.array([1.0 / (n - i) for i in range(n)], dtype=np.float64)
    if name in ('warmup10', 'warmup50'):
        frac = 0.1 if name == 'warmup10' else 0.5
        n_warm = int(n * frac)
        out = np.full(n, beta_end, dtype=np.float64)
        if n_warm > 0:
            out[:n_warm] = _ramp(beta_start, beta_end, n_warm)
        return out
    if name == 'cosine':
        # beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} for paper t = 1..T, capped at 0.999.
        out = []
        for paper_t in range(1, n + 1):
            ratio = cosine_alpha_bar(paper_t, n) / cosine_alpha_bar(paper_t - 1, n)
            out.append(min(1.0 - ratio, 0.999))
        return np.array(out, dtype=np.float64)
    raise KeyError(name)


# -------------------------------------------------------------------------------------------------
# Tables of the process
# -------------------------------------------------------------------------------------------------


class Process:
    """float64 tables of q for a given beta vector (Ho et al. §2, eqs. 4, 6, 7)."""

    def __init__(self, betas):
        betas = np.array(betas, dtype=np.float64)
        num = betas.shape[0]
        self.T = num
        self.betas = betas
        self.alphas = 1.0 - betas
        # alpha_bar_t = prod_{s <= t} alpha_s, by an explicit running product.
        abar = np.empty(num, dtype=np.float64)
        running = 1.0
        for i in range(num):
            running = running * self.alphas[i]
            abar[i] = running
        self.abar = abar
        self.abar_prev = np.empty(num, dtype=np.float64)
        self.abar_prev[0] = 1.0  # alpha_bar_0 of the paper (empty product)
        for i in range(1, num):
            self.abar_prev[i] = abar[i - 1]
        # Eq. 7.
        self.post_var = np.array(
            [betas[i] * (1.0 - self.abar_prev[i]) / (1.0 - abar[i]) for i in range(num)])
        self.post_coef_x0 = np.array(
            [math.sqrt(self.abar_prev[i]) * betas[i] / (1.0 - abar[i]) for i in range(num)])
        self.post_coef_xt = np.array(
            [math.sqrt(self.alphas[i]) * (1.0 - self.abar_prev[i]) / (1.0 - abar[i])
             for i in range(num)])
        # The posterior variance is 0 at index 0; its log is clipped to the value at index 1.
        clipped = self.post_var.copy()
        clipped[0] = self.post_var[1]
        self.post_logvar_clipped = np.log(clipped)
        # 'fixedlarge': variance beta_t, log-variance log([beta~_1, beta_1, ..., beta_{T-1}]).
        large = betas.copy()
        large[0] = self.post_var[1]
        self.fixedlarge_logvar = np.log(large)

    def tables(self):
        """Every table under the name `diffusion_jax.Diffusion` stores it."""
        return dict(
            betas=self.betas,
            alphas_cumprod=self.abar,
            alphas_cumprod_prev=self.abar_prev,
            sqrt_alphas_cumprod=np.sqrt(self.abar),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - self.abar),
            log_one_minus_alphas_cumprod=np.log(1.0 - self.abar),
            sqrt_recip_alphas_cumprod=1.0 / np.sqrt(self.abar),
            sqrt_recipm1_alphas_cumprod=np.sqrt((1.0 - self.abar) / self.abar),
            posterior_variance=self.post_var,
            posterior_log_variance_clipped=self.post_logvar_clipped,
            posterior_mean_coef1=self.post_coef_x0,
            posterior_mean_coef2=self.post_coef_xt,
        )


def at(table, t, ndim=4):
    """table[t] shaped [B, 1, 1, 1] (for `ndim` = 4)."""
    return np.asarray(table, dtype=np.float64)[np.asarray(t)].reshape((-1,) + (1,) * (ndim - 1))


# -------------------------------------------------------------------------------------------------
# The forward process q
# -------------------------------------------------------------------------------------------------


def q_mean_variance(proc, x0, t):
    """Eq. 4: q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
    abar = at(proc.abar, t, x0.ndim)
    var = 1.0 - abar
    return np.sqrt(abar) * x0, var, np.log(var)


def q_sample(proc, x0, t, noise):
    mean, var, _ = q_mean_variance(proc, x0, t)
    return mean + np.sqrt(var) * noise


def q_posterior(proc, x0, x_t, t):
    """Eqs. 6-7: (mu~, beta~, clipped log beta~)."""
    nd = x_t.ndim
    mean = at(proc.post_coef_x0, t, nd) * x0 + at(proc.post_coef_xt, t, nd) * x_t
    return mean, at(proc.post_var, t, nd), at(proc.post_logvar_clipped, t, nd)


def x0_from_eps(proc, x_t, t, eps):
    """Eq. 4 solved for x_0: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    abar = at(proc.abar, t, x_t.ndim)
    return (x_t - np.sqrt(1.0 - abar) * eps) / np.sqrt(abar)


def eps_from_x0(proc, x_t, t, x0):
    """Eq. 4 solved for eps: eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
    abar = at(proc.abar, t, x_t.ndim)
    return (x_t - np.sqrt(abar) * x0) / np.sqrt(1.0 - abar)


def x0_from_xprev(proc, x_t, t, xprev):
    """Eq. 7 solved for x_0 given mu~ = xprev."""
    c0 = at(proc.post_coef_x0, t, x_t.ndim)
    ct = at(proc.post_coef_xt, t, x_t.ndim)
    return (xprev - ct * x_t) / c0


def eps_mean(proc, x_t, t, eps):
    """Eq. 11: mu_theta = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)."""
    nd = x_t.ndim
    beta = at(proc.betas, t, nd)
    abar = at(proc.abar, t, nd)
    return (x_t - beta / np.sqrt(1.0 - abar) * eps) / np.sqrt(1.0 - beta)


# -------------------------------------------------------------------------------------------------
# The reverse process p
# -------------------------------------------------------------------------------------------------


def model_variance(proc, var_type, var_out, t, ndim=4):
    """(variance, log-variance) of p(x_{t-1} | x_t) for each variance type."""
    if var_type == 'fixedlarge':
        return at(proc.betas, t, ndim), at(proc.fixedlarge_logvar, t, ndim)
    if var_type == 'fixedsmall':
        return at(proc.post_var, t, ndim), at(proc.post_logvar_clipped, t, ndim)
    if var_type == 'learned':  # the network outputs log sigma^2 directly
        return np.exp(var_out), var_out
    if var_type == 'learned_range':  # IDDPM eq. 15
        w = 0.5 * (var_out + 1.0)
        logvar = w * np.log(at(proc.betas, t, ndim)) + (1.0 - w) * at(
            proc.post_logvar_clipped, t, ndim)
        return np.exp(logvar), logvar
    raise KeyError(var_type)


def p_mean_variance(proc, output, x_t, t, mean_type, var_type, clip_denoised):
    """Returns dict(mean, variance, log_variance, pred_x0) of p(x_{t-1} | x_t)."""
    output = np.asarray(output, dtype=np.float64)
    c = x_t.shape[-1]
    mean_ch = 3 * c if mean_type == 'dual' else c
    if var_type in ('learned', 'learned_range'):
        assert output.shape[-1] == mean_ch + c
        mean_out, var_out = output[..., :mean_ch], output[..., mean_ch:]
    else:
        assert output.shape[-1] == mean_ch
        mean_out, var_out = output, None
    var, logvar = model_variance(proc, var_type, var_out, t, x_t.ndim)

    def clip(v):
        return np.minimum(np.maximum(v, -1.0), 1.0) if clip_denoised else v

    if mean_type == 'xprev':
        # The network's output is the mean itself; x_0 is only reported.
        mean = mean_out
        pred_x0 = clip(x0_from_xprev(proc, x_t, t, mean_out))
    elif mean_type == 'eps':
        pred_x0 = clip(x0_from_eps(proc, x_t, t, mean_out))
        if clip_denoised:
            mean = q_posterior(proc, pred_x0, x_t, t)[0]
        else:
            mean = eps_mean(proc, x_t, t, mean_out)  # eq. 11 directly
    elif mean_type == 'x0':
        pred_x0 = clip(mean_out)
        mean = q_posterior(proc, pred_x0, x_t, t)[0]
    elif mean_type == 'dual':
        pred_x0 = clip(dual_x0(proc, mean_out, x_t, t))
        mean = q_posterior(proc, pred_x0, x_t, t)[0]
    else:
        raise KeyError(mean_type)
    return dict(mean=mean, variance=np.broadcast_to(var, x_t.shape),
                log_variance=np.broadcast_to(logvar, x_t.shape), pred_x0=pred_x0)


def dual_x0(proc, mean_out, x_t, t):
    """Benny & Wolf (2022): x̂_0 = r x_θ + (1 - r) x̂_0(ε_θ), r = sigmoid(logit), channels
    [ε_θ | x_θ | logit]."""
    c = x_t.shape[-1]
    eps, x0, logit = mean_out[..., :c], mean_out[..., c:2 * c], mean_out[..., 2 * c:3 * c]
    r = 1.0 / (1.0 + np.exp(-logit))
    return r * x0 + (1.0 - r) * x0_from_eps(proc, x_t, t, eps)


def dual_loss_and_grad(proc, mean_out, x0, x_t, t, noise):
    """The dual-output loss ‖ε - ε_θ‖² + ‖x_0 - x_θ‖² + ‖x_0 - x̂_0^comb‖² (pixel means), with ε_θ
    and x_θ held constant in the third term, and its gradient with respect to [ε_θ | x_θ | logit]
    written out by hand."""
    c = x0.shape[-1]
    n = x0[0].size
    eps, x0_out, logit = mean_out[..., :c], mean_out[..., c:2 * c], mean_out[..., 2 * c:]
    r = 1.0 / (1.0 + np.exp(-logit))
    x0_eps = x0_from_eps(proc, x_t, t, eps)
    comb = r * x0_out + (1.0 - r) * x0_eps
    loss = (pixel_mean((noise - eps) ** 2) + pixel_mean((x0 - x0_out) ** 2)
            + pixel_mean((x0 - comb) ** 2))
    grad = np.concatenate([2.0 * (eps - noise) / n, 2.0 * (x0_out - x0) / n,
                           2.0 * (comb - x0) * (x0_out - x0_eps) * r * (1.0 - r) / n], axis=-1)
    return loss, grad


def ddim_step(proc, x_t, t, s, pred_x0, eta, noise):
    """DDIM eq. 12 from level t to s (s = -1: ᾱ = 1), σ of eq. 16; x̂_0 given (the model's,
    clipped or not), ε̂ the noise that maps x_t to it."""
    abar_t = proc.abar[t]
    abar_s = 1.0 if s < 0 else proc.abar[s]
    eps = (x_t - math.sqrt(abar_t) * pred_x0) / math.sqrt(1.0 - abar_t)
    sigma = eta * math.sqrt((1.0 - abar_s) / (1.0 - abar_t)) * math.sqrt(1.0 - abar_t / abar_s)
    return (math.sqrt(abar_s) * pred_x0 + math.sqrt(max(1.0 - abar_s - sigma ** 2, 0.0)) * eps
            + sigma * noise)


def p_sample(proc, output, x_t, t, noise, mean_type, var_type, clip_denoised):
    """Algorithm 2, line 4: x_{t-1} = mu + sigma z, with z = 0 at the last step (index 0)."""
    out = p_mean_variance(proc, output, x_t, t, mean_type, var_type, clip_denoised)
    sigma = np.sqrt(np.exp(out['log_variance']))
    x_prev = out['mean'].copy()
    for b in range(x_t.shape[0]):
        if int(t[b]) > 0:
            x_prev[b] = x_prev[b] + sigma[b] * noise[b]
    return x_prev, out['pred_x0']


# -------------------------------------------------------------------------------------------------
# Divergences, the decoder, the bound
# -------------------------------------------------------------------------------------------------


def gaussian_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2/s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2."""
    s1sq = np.exp(logvar1)
    s2sq = np.exp(logvar2)
    log_ratio = 0.5 * (logvar2 - logvar1)
    return log_ratio + (s1sq + (mean1 - mean2) ** 2) / (2.0 * s2sq) - 0.5


def approx_cdf(z):
    """0.5 (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))); +-inf map to 1 / 0."""
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    inf = np.isinf(z)
    out[inf] = (z[inf] > 0).astype(np.float64)
    zf = z[~inf]
    out[~inf] = 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (zf + 0.044715 * zf ** 3)))
    return out


def discretized_log_likelihood(x, mean, log_scale):
    """Eq. 13 with the original code's numerics, per element.

    P(x) = F((hi - mean) / scale) - F((lo - mean) / scale) with [lo, hi] = [x - 1/255, x + 1/255],
    lo = -inf for x < -0.999 and hi = +inf for x > 0.999, F the tanh CDF; log floored at 1e-12.
    """
    x, mean, log_scale = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64)
                                               for a in (x, mean, log_scale)))
    lo = np.where(x < -0.999, -np.inf, x - 1.0 / 255.0)
    hi = np.where(x > 0.999, np.inf, x + 1.0 / 255.0)
    scale = np.exp(log_scale)
    with np.errstate(invalid='ignore'):
        p = approx_cdf((hi - mean) / scale) - approx_cdf((lo - mean) / scale)
    return np.log(np.maximum(p, 1e-12))


def pixel_mean(x):
    return np.mean(x.reshape(x.shape[0], -1), axis=1)


def vb_terms_elementwise(proc, output, x0, x_t, t, mean_type, var_type, clip_denoised):
    """Per element, in nats: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, the decoder's
    -log p(x_0 | x_1) for t = 0 (eq. 5's L_{t-1} and L_0). Also returns pred_x0."""
    q_mean, _, q_logvar = q_posterior(proc, x0, x_t, t)
    p = p_mean_variance(proc, output, x_t, t, mean_type, var_type, clip_denoised)
    out = np.empty(x0.shape, dtype=np.float64)
    for b in range(x0.shape[0]):
        if int(t[b]) == 0:
            out[b] = -discretized_log_likelihood(
                x0[b], p['mean'][b], 0.5 * p['log_variance'][b])
        else:
            out[b] = gaussian_kl(q_mean[b], np.broadcast_to(q_logvar[b], x0[b].shape),
                                 p['mean'][b], p['log_variance'][b])
    return out, p['pred_x0']


def vb_terms_bpd(proc, output, x0, x_t, t, mean_type, var_type, clip_denoised):
    """L_{t-1} of eq. 5 per example in bits/dim."""
    terms, pred_x0 = vb_terms_elementwise(proc, output, x0, x_t, t, mean_type, var_type,
                                          clip_denoised)
    return pixel_mean(terms) / LN2, pred_x0


def prior_bpd(proc, x0):
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim."""
    t = np.full(x0.shape[0], proc.T - 1)
    mean, _, logvar = q_mean_variance(proc, x0, t)
    kl = gaussian_kl(mean, np.broadcast_to(logvar, x0.shape), 0.0, 0.0)
    return pixel_mean(kl) / LN2


def mse_target(proc, mean_type, x0, x_t, t, noise):
    if mean_type == 'eps':
        return noise
    if mean_type == 'x0':
        return x0
    return q_posterior(proc, x0, x_t, t)[0]


def training_losses(proc, output, x0, x_t, t, noise, mean_type, var_type, loss_type,
                    hybrid_lambda=0.001):
    """'mse': L_simple (eq. 14, a pixel mean) on the mean-type's target. 'kl': the single bound
    term L_{t-1} in bits/dim (unclipped). 'hybrid' (IDDPM): L_simple + lambda * L_vlb, where the
    one-sample estimate of L_vlb = sum_t L_t for uniform t is T * L_{t-1}."""
    if loss_type == 'kl':
        return vb_terms_bpd(proc, output, x0, x_t, t, mean_type, var_type, False)[0]
    c = x0.shape[-1]
    mean_out = output[..., :c]
    loss = pixel_mean((mse_target(proc, mean_type, x0, x_t, t, noise) - mean_out) ** 2)
    if loss_type == 'hybrid':
        vb = vb_terms_bpd(proc, output, x0, x_t, t, mean_type, var_type, False)[0]
        loss = loss + hybrid_lambda * proc.T * vb
    return loss


def total_bpd(proc, x0, noises, denoise_fn, clip_denoised, mean_type, var_type):
    """Sum of every bound term L_0 .. L_{T-1} plus the prior term, bits/dim per example.

    noises[i] is the standard normal noise used to draw x_i from q(x_i | x_0).
    """
    terms = np.zeros((x0.shape[0], proc.T))
    mses = np.zeros((x0.shape[0], proc.T))
    for i in range(proc.T):
        t = np.full(x0.shape[0], i)
        x_t = q_sample(proc, x0, t, noises[i])
        bits, pred_x0 = vb_terms_bpd(proc, denoise_fn(x_t, t), x0, x_t, t, mean_type, var_type,
                                     clip_denoised)
        terms[:, i] = bits
        mses[:, i] = pixel_mean((pred_x0 - x0) ** 2)
    prior = prior_bpd(proc, x0)
    return dict(total_bpd=terms.sum(axis=1) + prior, prior_bpd=prior, terms_bpd=terms,
                x0_mse=mses)

"""The Gaussian diffusion process of Ho et al. (2020) as pure functions of frozen tables.

Notation follows the paper, with time 0-indexed: code index t = 0 is the paper's t = 1. Images are
NHWC in [-1, 1]; `t` is an int32 vector of shape [B]. Equation numbers refer to Ho et al. (2020);
"IDDPM" to Nichol & Dhariwal (2021), "dual" to Benny & Wolf (2022).
"""

import math
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

MEAN_TYPES = ('eps', 'x0', 'xprev', 'dual')
VAR_TYPES = ('fixedlarge', 'fixedsmall', 'learned', 'learned_range')
LOSS_TYPES = ('mse', 'kl', 'hybrid')


def _check_name(kind, name, valid):
    if name not in valid:
        raise ValueError(f'Unknown {kind} {name!r}; valid: {", ".join(valid)}')


def mean_flat(x):
    """Mean over every axis but the batch axis."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF used by the original code."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """log p(x) of data x in [-1, 1] on a 256-level grid under N(means, exp(log_scales)^2).

    The decoder of §3.3 (eq. 13): bins of half-width 1/255, the edge bins extend to -inf / +inf.
    """
    centered_x = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _extract(table, t, x_shape):
    """table[t] reshaped to broadcast against a batch of shape x_shape."""
    return table[t].reshape((t.shape[0],) + (1,) * (len(x_shape) - 1))


@flax.struct.dataclass
class Diffusion:
    """Frozen float32 tables of a beta schedule plus the model's parameterization.

    A pytree: the tables are leaves (so it can be passed into `jax.jit`), the type strings static.
    Build it with `Diffusion.create`.
    """
    betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    one_minus_alphas_cumprod: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    mean_type: str = flax.struct.field(pytree_node=False, default='eps')
    var_type: str = flax.struct.field(pytree_node=False, default='fixedlarge')
    loss_type: str = flax.struct.field(pytree_node=False, default='mse')
    hybrid_lambda: float = flax.struct.field(pytree_node=False, default=0.001)

    @classmethod
    def create(cls, betas, mean_type='eps', var_type='fixedlarge', loss_type='mse',
               hybrid_lambda=0.001):
        """Computes every table in float64 from `betas` and stores it as float32.

        Args:
          betas: 1-D array of the T betas (see `schedules.get_beta_schedule`).
          mean_type: what the network predicts: 'eps' (ε, the paper's choice), 'x0', 'xprev', or
            'dual' (ε, x_0 and a per-pixel logit of the weight r that mixes the two x̂_0).
          var_type: 'fixedlarge' (β_t), 'fixedsmall' (β̃_t), 'learned' (log-variance output) or
            'learned_range' (IDDPM's interpolation between log β̃_t and log β_t).
          loss_type: 'mse' (L_simple), 'kl' (the true bound) or 'hybrid' (IDDPM).
          hybrid_lambda: λ of the hybrid loss L_simple + λ L_vlb.
        """
        _check_name('mean_type', mean_type, MEAN_TYPES)
        _check_name('var_type', var_type, VAR_TYPES)
        _check_name('loss_type', loss_type, LOSS_TYPES)
        if loss_type == 'mse' and var_type in ('learned', 'learned_range'):
            raise ValueError(f"loss_type 'mse' gives no gradient to a {var_type!r} variance; "
                             "use loss_type 'hybrid' or 'kl'")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
            raise ValueError('betas must be a 1-D array with every entry in (0, 1]')
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        # Eq. 7: β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t); β̃ at t = 0 is 0, so its log is clipped to
        # the value at t = 1.
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        posterior_log_variance_clipped = np.log(
            np.append(posterior_variance[1], posterior_variance[1:]))
        tables = dict(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            # 1 - ᾱ_t is ~1e-4 at t = 0: subtracting in float32 at run time would lose digits.
            one_minus_alphas_cumprod=1.0 - alphas_cumprod,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
            log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=posterior_log_variance_clipped,
            # Eq. 7: μ̃ = coef1 x_0 + coef2 x_t.
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas)
            / (1.0 - alphas_cumprod),
        )
        return cls(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in tables.items()},
                   mean_type=mean_type, var_type=var_type, loss_type=loss_type,
                   hybrid_lambda=hybrid_lambda)

    @property
    def num_timesteps(self):
        return self.betas.shape[0]

    @property
    def learned_variance(self):
        return self.var_type in ('learned', 'learned_range')

    @property
    def output_groups(self):
        """Model output channels per image channel: 3 for dual (ε, x_0, logit), plus 1 for a
        learned variance."""
        return (3 if self.mean_type == 'dual' else 1) + (1 if self.learned_variance else 0)

    # --- what the training step needs (shared with sde.SDE and sde.NCSN) ------------------------

    def sample_t(self, rng, batch_size):
        """t ~ Uniform{0, ..., T-1} (Algorithm 1, line 3)."""
        return jax.random.randint(rng, (batch_size,), 0, self.num_timesteps, dtype=jnp.int32)

    def time_label(self, t):
        """The network's time input: the timestep itself."""
        return t

    # --- the forward process q -----------------------------------------------------------------

    def q_mean_variance(self, x0, t):
        """q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I) (eq. 4): (mean, variance, log_variance)."""
        mean = _extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
        variance = _extract(self.one_minus_alphas_cumprod, t, x0.shape)
        log_variance = _extract(self.log_one_minus_alphas_cumprod, t, x0.shape)
        return mean, variance, log_variance

    def q_sample(self, x0, t, noise):
        """A draw from q(x_t | x_0) given the standard normal `noise` (eq. 4)."""
        return (_extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise)

    def q_posterior(self, x0, x_t, t):
        """q(x_{t-1} | x_t, x_0) = N(μ̃, β̃ I) (eqs. 6-7): (mean, variance, clipped log-var)."""
        mean = (_extract(self.posterior_mean_coef1, t, x_t.shape) * x0
                + _extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        variance = _extract(self.posterior_variance, t, x_t.shape)
        log_variance = _extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # --- conversions between parameterizations -------------------------------------------------

    def predict_x0_from_eps(self, x_t, t, eps):
        """x̂_0 = sqrt(1/ᾱ_t) x_t - sqrt(1/ᾱ_t - 1) ε (eq. 4 solved for x_0)."""
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

    def predict_eps_from_x0(self, x_t, t, x0):
        """The ε that `predict_x0_from_eps` maps to x0."""
        return ((_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x0)
                / _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape))

    def predict_x0_from_xprev(self, x_t, t, xprev):
        """Inverts the posterior mean (eq. 7): x_0 = (μ̃ - coef2 x_t) / coef1."""
        return ((xprev - _extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
                / _extract(self.posterior_mean_coef1, t, x_t.shape))

    # --- the reverse process p -----------------------------------------------------------------

    def split_model_output(self, model_output):
        """Splits the output into (mean part, variance part or None): a learned variance is the
        last C of the `output_groups` × C channels."""
        if self.learned_variance:
            channels = model_output.shape[-1] // self.output_groups
            return model_output[..., :-channels], model_output[..., -channels:]
        return model_output, None

    def split_dual(self, output):
        """The dual mean part [..., 3C] as (ε_θ, x_θ, r = sigmoid(logit))."""
        eps, x0, logit = jnp.split(output, 3, axis=-1)
        return eps, x0, jax.nn.sigmoid(logit)

    def predict_x0(self, output, x_t, t):
        """x̂_0 from the mean part of the output, unclipped.

        For 'dual' (Benny & Wolf 2022): x̂_0 = r x_θ + (1 - r) x̂_0(ε_θ). μ̃ (eq. 7) and the DDIM
        update are linear in x̂_0 for a given x_t, so this mixes the two x_{t-1} estimates.
        """
        if self.mean_type == 'eps':
            return self.predict_x0_from_eps(x_t, t, output)
        if self.mean_type == 'x0':
            return output
        if self.mean_type == 'xprev':
            return self.predict_x0_from_xprev(x_t, t, output)
        return self._dual_x0(*self.split_dual(output), x_t, t)

    def _dual_x0(self, eps, x0, r, x_t, t):
        return r * x0 + (1.0 - r) * self.predict_x0_from_eps(x_t, t, eps)

    def _model_log_variance(self, var_values, t, shape):
        if self.var_type == 'fixedlarge':
            # Variance β_t; log-variance log([β̃_1, β_1, ..., β_{T-1}]) so the t = 0 decoder is not
            # degenerate (the original code's choice).
            log_table = jnp.concatenate(
                [self.posterior_variance[1:2], self.betas[1:]])
            log_variance = _extract(jnp.log(log_table), t, shape)
            return _extract(self.betas, t, shape), log_variance
        if self.var_type == 'fixedsmall':
            return (_extract(self.posterior_variance, t, shape),
                    _extract(self.posterior_log_variance_clipped, t, shape))
        if self.var_type == 'learned':
            return jnp.exp(var_values), var_values
        # 'learned_range' (IDDPM eq. 15): v in [-1, 1] interpolates log β̃_t and log β_t.
        frac = (var_values + 1.0) / 2.0
        min_log = _extract(self.posterior_log_variance_clipped, t, shape)
        max_log = _extract(jnp.log(self.betas), t, shape)
        log_variance = frac * max_log + (1.0 - frac) * min_log
        return jnp.exp(log_variance), log_variance

    def p_mean_variance(self, model_output, x_t, t, clip_denoised=True):
        """p(x_{t-1} | x_t) from the network's output.

        Args:
          model_output: [B, H, W, C] (or [B, H, W, 2C] for learned variances).
          x_t: [B, H, W, C].
          t: int [B].
          clip_denoised: clip x̂_0 to [-1, 1] before forming the mean (as the paper's sampler does).

        Returns:
          dict with `mean`, `variance`, `log_variance` (broadcastable to x_t) and `pred_x0`.
        """
        output, var_values = self.split_model_output(model_output)
        if model_output.shape != x_t.shape[:-1] + (self.output_groups * x_t.shape[-1],):
            raise ValueError(f'model output {model_output.shape} does not fit x_t {x_t.shape} '
                             f'for mean_type {self.mean_type!r} and var_type {self.var_type!r}')
        variance, log_variance = self._model_log_variance(var_values, t, x_t.shape)
        clip = (lambda x: jnp.clip(x, -1.0, 1.0)) if clip_denoised else (lambda x: x)
        pred_x0 = clip(self.predict_x0(output, x_t, t))
        if self.mean_type == 'xprev':
            mean = output
        else:
            mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        return dict(mean=mean, variance=variance, log_variance=log_variance, pred_x0=pred_x0)

    def p_sample(self, model_output, x_t, t, noise, clip_denoised=True, guidance=None):
        """One ancestral step x_t -> x_{t-1} (Algorithm 2); no noise is added at t = 0.

        `guidance` g = s ∇ log p(y | x_t) shifts the mean to μ + Σ g (classifier guidance,
        Dhariwal & Nichol 2021, Algorithm 1).
        """
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised)
        mean = out['mean'] if guidance is None else out['mean'] + out['variance'] * guidance
        nonzero = (t != 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
        x_prev = mean + nonzero * jnp.exp(0.5 * out['log_variance']) * noise
        return x_prev, out['pred_x0']

    # --- the variational bound (eq. 5) and the losses ------------------------------------------

    def vb_terms_bpd(self, model_output, x0, x_t, t, clip_denoised=True):
        """The bound term L_{t-1} of eq. 5 in bits/dim, per example.

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the decoder's -log p(x_0 | x_1)
        (eq. 13) for t = 0, each averaged over pixels and divided by ln 2.

        Returns:
          (bits/dim [B], x̂_0 [B, H, W, C]).
        """
        true_mean, _, true_log_variance = self.q_posterior(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out['mean'], out['log_variance']))
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x0, means=out['mean'], log_scales=0.5 * out['log_variance']))
        bits = jnp.where(t == 0, decoder_nll, kl) / math.log(2.0)
        return bits, out['pred_x0']

    def prior_bpd(self, x0):
        """KL(q(x_T | x_0) || N(0, I)) in bits/dim per example (the L_T term of eq. 5)."""
        t = jnp.full((x0.shape[0],), self.num_timesteps - 1, dtype=jnp.int32)
        mean, _, log_variance = self.q_mean_variance(x0, t)
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)

    def training_losses(self, model_output, x0, x_t, t, noise):
        """Per-example training loss for `loss_type` (mean over pixels, not a sum).

        'mse' is L_simple (eq. 14) for eps; for x0 / xprev the same squared error on that target.
        For 'dual' (Benny & Wolf 2022) the squared errors of ε_θ and x_θ plus that of the combined
        x̂_0 with ε_θ and x_θ frozen, so r learns only from the combined term.
        'kl' is the bound term L_{t-1} (eq. 5) in bits/dim. 'hybrid' (IDDPM §3.1) is
        L_simple + λ L_vlb with a stop-gradient on the mean in L_vlb, where L_vlb for a uniformly
        drawn t is estimated by T · L_t (so λ = 0.001 with T = 1000 weighs L_t by 1).

        Returns:
          float32 [B].
        """
        if self.loss_type == 'kl':
            return self.vb_terms_bpd(model_output, x0, x_t, t, clip_denoised=False)[0]
        output, var_values = self.split_model_output(model_output)
        if self.mean_type == 'dual':
            eps, pred, r = self.split_dual(output)
            sg = jax.lax.stop_gradient
            loss = (mean_flat(jnp.square(noise - eps)) + mean_flat(jnp.square(x0 - pred))
                    + mean_flat(jnp.square(x0 - self._dual_x0(sg(eps), sg(pred), r, x_t, t))))
        else:
            target = {'eps': noise, 'x0': x0,
                      'xprev': self.q_posterior(x0, x_t, t)[0]}[self.mean_type]
            loss = mean_flat(jnp.square(target - output))
        if self.loss_type == 'hybrid':
            frozen = jax.lax.stop_gradient(output)
            if var_values is not None:
                frozen = jnp.concatenate([frozen, var_values], axis=-1)
            vb = self.vb_terms_bpd(frozen, x0, x_t, t, clip_denoised=False)[0]
            loss = loss + self.hybrid_lambda * self.num_timesteps * vb
        return loss


def bound_terms(denoise_fn: Callable, diffusion: Diffusion, x0, rng, timesteps, *,
                clip_denoised=True, timestep_batch=1):
    """The bound terms L_t (eq. 5) and the x̂_0 errors at the given timesteps.

    Args:
      denoise_fn: (x_t, t) -> model output.
      diffusion: the process.
      x0: data in [-1, 1], [B, H, W, C].
      rng: key; the noise at step t is drawn from fold_in(rng, t), so any split of the timesteps
        into calls gives the same terms.
      timesteps: int [K], the t to evaluate.
      clip_denoised: clip x̂_0 inside p (the original evaluation does).
      timestep_batch: timesteps evaluated together by `lax.map` (memory vs. speed).

    Returns:
      (bits/dim [B, K], mean squared error of x̂_0 [B, K]).
    """
    def term(t_scalar):
        t = jnp.full((x0.shape[0],), t_scalar, dtype=jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(rng, t_scalar), x0.shape, x0.dtype)
        x_t = diffusion.q_sample(x0, t, noise)
        bits, pred_x0 = diffusion.vb_terms_bpd(denoise_fn(x_t, t), x0, x_t, t, clip_denoised)
        return bits, mean_flat(jnp.square(pred_x0 - x0))

    terms, mse = jax.lax.map(term, jnp.asarray(timesteps, jnp.int32), batch_size=timestep_batch)
    return terms.T, mse.T


def calc_bpd_loop(denoise_fn: Callable, diffusion: Diffusion, x0, rng, *, clip_denoised=True,
                  timestep_batch=1):
    """The whole variational bound of eq. 5 in bits/dim, one forward pass per timestep.

    Args:
      denoise_fn, diffusion, x0, rng, clip_denoised, timestep_batch: see `bound_terms`.

    Returns:
      dict with `total_bpd` [B], `prior_bpd` [B], `terms_bpd` [B, T] (L_0 .. L_{T-1}) and
      `x0_mse` [B, T] (mean squared error of x̂_0 at each t, for rate–distortion).
    """
    terms, mse = bound_terms(denoise_fn, diffusion, x0, rng, jnp.arange(diffusion.num_timesteps),
                             clip_denoised=clip_denoised, timestep_batch=timestep_batch)
    prior = diffusion.prior_bpd(x0)
    return dict(total_bpd=jnp.sum(terms, axis=1) + prior, prior_bpd=prior,
                terms_bpd=terms, x0_mse=mse)

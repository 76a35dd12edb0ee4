"""2-D ground truth for score-based models: a Gaussian mixture whose score is known in closed
form under every SDE's marginal, an MLP score model, and a seconds-long training run.

Under x_t = m(t) x_0 + s(t) z (VP, sub-VP, VE and NCSN all have this form), a mixture
Σ_k w_k N(μ_k, τ_k² I) stays a mixture: p_t = Σ_k w_k N(m μ_k, (m² τ_k² + s²) I). Its score
drives every sampler through `exact_eps_model`, so the samplers are checked against the truth
without any training; the ODE likelihood is checked against the analytic log p_ε.

    python -m diffusion_jax.main --config=configs/toy2d.py --workdir=runs/toy2d
"""

import dataclasses
import functools
import json
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from diffusion_jax import losses
from diffusion_jax import sde as sde_lib
from diffusion_jax import train_state as train_state_lib
from diffusion_jax import train_step as train_step_lib
from diffusion_jax.evaluation import two_sample
from diffusion_jax.models.layers import get_timestep_embedding

DATA_NAME = 'gmm2d'


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """Isotropic Gaussian mixture in R^d; tuples keep it hashable (a jit static)."""
    means: tuple = ((-1.0, -1.0), (1.0, 1.0), (1.0, -1.0))
    stds: tuple = (0.15, 0.25, 0.2)
    weights: tuple = (0.5, 0.3, 0.2)

    def sample(self, rng, n):
        """n points, float32 [n, d]."""
        k_rng, z_rng = jax.random.split(rng)
        k = jax.random.choice(k_rng, len(self.weights), (n,), p=jnp.asarray(self.weights))
        means, stds = jnp.asarray(self.means), jnp.asarray(self.stds)
        return means[k] + stds[k][:, None] * jax.random.normal(z_rng, (n, len(self.means[0])))

    def _components(self, x, m, s):
        """log w_k N(x; m μ_k, v_k I) [B, K] and v_k [B, K] for per-sample m, s [B]."""
        means, stds = jnp.asarray(self.means), jnp.asarray(self.stds)
        var = jnp.square(m[:, None] * stds[None]) + jnp.square(s)[:, None]
        diff = x[:, None, :] - m[:, None, None] * means[None]
        d = x.shape[-1]
        log_n = (-0.5 * d * jnp.log(2 * jnp.pi * var)
                 - 0.5 * jnp.sum(jnp.square(diff), -1) / var)
        return jnp.log(jnp.asarray(self.weights))[None] + log_n, var, diff

    def log_prob(self, x, m=None, s=None):
        """log p_t(x) [B] of the mixture under x_t = m x_0 + s z (default: the data, m=1, s=0)."""
        m = jnp.ones(x.shape[:1]) if m is None else m
        s = jnp.zeros(x.shape[:1]) if s is None else s
        return jax.nn.logsumexp(self._components(x, m, s)[0], axis=-1)

    def score(self, x, m, s):
        """∇_x log p_t(x) [B, d]: responsibilities times each component's -(x - m μ_k) / v_k."""
        log_c, var, diff = self._components(x, m, s)
        resp = jax.nn.softmax(log_c, axis=-1)
        return -jnp.sum((resp / var)[..., None] * diff, axis=1)


def marginal_scales(process, label):
    """m(t), s(t) [B] of the process at the network's time label."""
    if isinstance(process, sde_lib.NCSN):
        level = jnp.round((1.0 - label / 999.0) * (process.num_scales - 1)).astype(jnp.int32)
        return jnp.ones_like(label), process.sigma(level)
    return sde_scales(process, label / 999.0)


def sde_scales(sde, t):
    """m(t), s(t) [B] of an SDE at times t [B]."""
    m, s = sde.marginal_prob(jnp.ones((t.shape[0], 1)), t)
    return m[:, 0], s


def exact_eps_model(mixture, process):
    """model_apply(params, x, label) -> ε = -s(t) ∇ log p_t(x): the ideal ε-network, so that
    `sde.score` of it is the true score (params are ignored)."""
    def model_apply(params, x, label):
        del params
        m, s = marginal_scales(process, jnp.asarray(label, jnp.float32))
        return -s[:, None] * mixture.score(x, m, s)
    return model_apply


class ScoreMLP(nn.Module):
    """ε_θ(x, t) for vector data: an MLP on [x, sinusoidal(t)] with SiLU."""
    hidden: int = 128
    num_layers: int = 3
    embedding_dim: int = 32

    @nn.compact
    def __call__(self, x, t, train=False):
        del train
        h = jnp.concatenate([x, get_timestep_embedding(jnp.asarray(t), self.embedding_dim)], -1)
        for _ in range(self.num_layers):
            h = nn.silu(nn.Dense(self.hidden)(h))
        return nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros)(h)


def make_model_apply(model):
    def model_apply(params, x, t):
        return model.apply({'params': params}, x, t)
    return model_apply


def train_score_mlp(config, process, mixture, *, progress=True, chunk=250):
    """Trains a ScoreMLP on fresh mixture samples each step (the data are infinite), `chunk`
    steps per jitted scan.

    Returns:
      (the model, the EMA parameters, the loss of every step).
    """
    model = ScoreMLP(hidden=config.model.hidden, num_layers=config.model.num_layers)
    rng = jax.random.key(config.seed)
    params = model.init(rng, jnp.zeros((1, 2)), jnp.zeros((1,)))['params']
    optimizer = train_state_lib.make_optimizer(config.optim)
    grad_fn = jax.value_and_grad(losses.make_diffusion_loss(model, process), has_aux=True)
    data_rng = jax.random.fold_in(rng, 0xDA7A)

    def one_step(state, _):
        batch = {'image': mixture.sample(jax.random.fold_in(data_rng, state.step),
                                         config.training.batch_size)}
        state, metrics = train_step_lib.train_step(
            state, batch, rng, grad_fn=grad_fn, optimizer=optimizer,
            optim_config=config.optim, process=process)
        return state, metrics['loss']

    @functools.partial(jax.jit, static_argnames='length')
    def run_chunk(state, length):
        return jax.lax.scan(one_step, state, None, length=length)

    state = train_state_lib.create_train_state(params, optimizer)
    history, total = [], config.training.num_train_steps
    with tqdm(total=total, desc='training', unit='step', disable=not progress) as bar:
        for start in range(0, total, chunk):
            state, chunk_losses = run_chunk(state, min(chunk, total - start))
            history.append(np.asarray(chunk_losses))
            bar.update(len(history[-1]))
    history = np.concatenate(history)
    if not np.all(np.isfinite(history)):
        raise FloatingPointError(f'non-finite loss at step {int(np.argmin(np.isfinite(history)))}')
    return model, state.ema_params, history


def distribution_checks(samples, mixture, rng):
    """MMD² and sliced Wasserstein of samples vs fresh data, next to data vs data at the same n."""
    n = len(samples)
    data_a, data_b = (np.asarray(mixture.sample(jax.random.fold_in(rng, i), n)) for i in (0, 1))
    return dict(mmd2=two_sample.mmd_squared(samples, data_a),
                mmd2_data=two_sample.mmd_squared(data_b, data_a),
                sliced_w2=two_sample.sliced_wasserstein(samples, data_a),
                sliced_w2_data=two_sample.sliced_wasserstein(data_b, data_a))


def write_figure(path, samples, data, sampler, history):
    """Data and samples side by side, and the training loss."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, points, name in ((axes[0], data, 'data'), (axes[1], samples, f'{sampler} samples')):
        ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5)
        ax.set(title=name, xlim=(-2.5, 2.5), ylim=(-2.5, 2.5), aspect='equal')
    axes[2].plot(history)
    axes[2].set(title='training loss', xlabel='step', yscale='log')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_metrics(workdir, metrics):
    logging.info('%s', metrics)
    with open(os.path.join(workdir, 'toy_metrics.json'), 'w') as f:
        json.dump(metrics, f, indent=2)


def run(config, workdir):
    """`--mode=train` for data.name = 'gmm2d': trains, samples with the configured sampler and
    writes toy_metrics.json (sample distances and, for SDEs, ODE log-likelihoods next to the true
    ones) and toy.png (data, samples, training loss)."""
    from diffusion_jax import sampling, train
    from diffusion_jax.evaluation import ode_likelihood
    os.makedirs(workdir, exist_ok=True)
    mixture = GaussianMixture()
    process = train.make_diffusion(config.diffusion)
    sampling.check_sampling_config(config.sampling, process)
    model, params, history = train_score_mlp(config, process, mixture)
    model_apply = make_model_apply(model)
    rng = jax.random.fold_in(jax.random.key(config.seed), 0x5A3)
    samples, _ = sampling.sample_batch(config.sampling, model_apply, params, process, rng,
                                       (config.sampling.num_samples, 2))
    samples = np.asarray(jax.device_get(samples), np.float64)
    metrics = dict(sampler=config.sampling.sampler, process=config.diffusion.process,
                   final_loss=float(np.mean(history[-100:])),
                   **distribution_checks(samples, mixture, jax.random.fold_in(rng, 1)))
    if isinstance(process, sde_lib.SDE):
        data = mixture.sample(jax.random.fold_in(rng, 2), config.data.num_eval)
        logp, _, _ = ode_likelihood.log_likelihood(model_apply, params, process, data,
                                                   jax.random.fold_in(rng, 3), method='exact')
        m, s = sde_scales(process, jnp.full((len(data),), process.sample_eps))
        metrics.update(ode_log_likelihood=float(jnp.mean(logp)),
                       true_log_likelihood=float(jnp.mean(mixture.log_prob(data, m, s))))
    log_metrics(workdir, metrics)
    write_figure(os.path.join(workdir, 'toy.png'), samples,
                 np.asarray(mixture.sample(jax.random.fold_in(rng, 4), len(samples))),
                 config.sampling.sampler, history)
    return metrics

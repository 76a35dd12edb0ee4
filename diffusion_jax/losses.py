"""Training losses as pure functions of (params, batch, randomness) -> (loss, metrics)."""

import jax
import jax.numpy as jnp


def draw_timesteps_and_noise(rng, x0, process):
    """t from the process (DDPM: Uniform{0, ..., T-1}, Algorithm 1 line 3; SDE: U[ε, 1];
    NCSN: a noise level) and ε ~ N(0, I) (line 4) for a batch."""
    t_rng, noise_rng = jax.random.split(rng)
    return process.sample_t(t_rng, x0.shape[0]), jax.random.normal(noise_rng, x0.shape, x0.dtype)


def make_diffusion_loss(model, diffusion):
    """The per-batch loss of `diffusion` (a `Diffusion`, an `sde.SDE` or an `sde.NCSN`) for
    the network `model`.

    Returns:
      loss_fn(params, x0, t, noise, dropout_rng) -> (mean loss over the batch, metrics).
      The mean over the batch is what the paper optimizes (not a sum).
    """
    def loss_fn(params, x0, t, noise, dropout_rng):
        x_t = diffusion.q_sample(x0, t, noise)
        model_output = model.apply({'params': params}, x_t, diffusion.time_label(t), train=True,
                                   rngs={'dropout': dropout_rng})
        losses = diffusion.training_losses(model_output, x0, x_t, t, noise)
        loss = jnp.mean(losses)
        return loss, {'loss': loss}

    return loss_fn

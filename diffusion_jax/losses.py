"""Training losses as pure functions of (params, batch, randomness) -> (loss, metrics)."""

import jax
import jax.numpy as jnp


def draw_timesteps_and_noise(rng, x0, num_timesteps):
    """t ~ Uniform{0, ..., T-1} and ε ~ N(0, I) for a batch (Algorithm 1, lines 3-4)."""
    t_rng, noise_rng = jax.random.split(rng)
    t = jax.random.randint(t_rng, (x0.shape[0],), 0, num_timesteps, dtype=jnp.int32)
    return t, jax.random.normal(noise_rng, x0.shape, x0.dtype)


def make_diffusion_loss(model, diffusion):
    """The per-batch loss of `diffusion.loss_type` for the U-Net `model`.

    Returns:
      loss_fn(params, x0, t, noise, dropout_rng) -> (mean loss over the batch, metrics).
      The mean over the batch is what the paper optimizes (not a sum).
    """
    def loss_fn(params, x0, t, noise, dropout_rng):
        x_t = diffusion.q_sample(x0, t, noise)
        model_output = model.apply({'params': params}, x_t, t, train=True,
                                   rngs={'dropout': dropout_rng})
        losses = diffusion.training_losses(model_output, x0, x_t, t, noise)
        loss = jnp.mean(losses)
        return loss, {'loss': loss}

    return loss_fn

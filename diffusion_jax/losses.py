"""Training losses as pure functions of (params, batch, randomness) -> (loss, metrics)."""

import jax
import jax.numpy as jnp
import optax


def draw_timesteps_and_noise(rng, x0, process):
    """t from the process (DDPM: Uniform{0, ..., T-1}, Algorithm 1 line 3; SDE: U[ε, 1];
    NCSN: a noise level) and ε ~ N(0, I) (line 4) for a batch."""
    t_rng, noise_rng = jax.random.split(rng)
    return process.sample_t(t_rng, x0.shape[0]), jax.random.normal(noise_rng, x0.shape, x0.dtype)


def drop_labels(rng, labels, null_label, rate):
    """Classifier-free guidance training (Ho & Salimans 2022, Algorithm 1): each label is
    replaced by the null label with probability `rate`."""
    return jnp.where(jax.random.bernoulli(rng, rate, labels.shape), null_label, labels)


def make_diffusion_loss(model, diffusion, *, label_dropout=0.0):
    """The per-batch loss of `diffusion` (a `Diffusion`, an `sde.SDE` or an `sde.NCSN`) for
    the network `model`; a class-conditional U-Net (num_classes > 0) sees the batch's labels,
    each dropped to the null label with probability `label_dropout`.

    Returns:
      loss_fn(params, batch, t, noise, rng) -> (mean loss over the batch, metrics), with batch
      a dict holding `image` [B, H, W, C] (and `label` [B] for a conditional network).
      The mean over the batch is what the paper optimizes (not a sum).
    """
    num_classes = getattr(model, 'num_classes', 0)

    def loss_fn(params, batch, t, noise, rng):
        dropout_rng, label_rng = jax.random.split(rng)
        x0 = batch['image']
        x_t = diffusion.q_sample(x0, t, noise)
        kwargs = {}
        if num_classes:
            kwargs['y'] = drop_labels(label_rng, batch['label'], num_classes, label_dropout)
        model_output = model.apply({'params': params}, x_t, diffusion.time_label(t), train=True,
                                   rngs={'dropout': dropout_rng}, **kwargs)
        losses = diffusion.training_losses(model_output, x0, x_t, t, noise)
        loss = jnp.mean(losses)
        return loss, {'loss': loss}

    return loss_fn


def make_classifier_loss(classifier, process):
    """Cross-entropy of the noise-aware classifier on x_t = q_sample(x_0, t, ε), with t and ε
    drawn as for the diffusion loss (Dhariwal & Nichol 2021, §4).

    Returns:
      loss_fn(params, batch, t, noise, rng) -> (mean cross-entropy, {loss, accuracy}).
    """
    def loss_fn(params, batch, t, noise, rng):
        x_t = process.q_sample(batch['image'], t, noise)
        logits = classifier.apply({'params': params}, x_t, process.time_label(t), train=True,
                                  rngs={'dropout': rng})
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']))
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
        return loss, {'loss': loss, 'accuracy': accuracy}

    return loss_fn

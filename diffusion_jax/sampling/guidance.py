"""Class-conditional sampling: classifier-free guidance and classifier guidance.

Every sampler takes a network `model_apply(params, x, t)` with `params` an arbitrary pytree; here
`params` is a bundle dict, so labels and guidance scales are traced values (one compilation for
every scale and label set):

  params     the U-Net's parameters
  labels     int [B], the class requested of each sample
  guidance_scale   w (classifier-free) or s (classifier), a float scalar
  classifier the noise-aware classifier's parameters (classifier guidance only)

Classifier-free guidance (Ho & Salimans 2022, eq. 6) changes the network's output:
  ε̃(x, t, y) = (1 + w) ε(x, t, y) - w ε(x, t, ∅),
so it works with every sampler of an ε-network (ancestral, DDIM, PC, ODE). Classifier guidance
(Dhariwal & Nichol 2021) adds g = s ∇_x log p_φ(y | x_t, t) to the sampler's step: the ancestral
mean becomes μ + Σ g (their Algorithm 1), DDIM's noise ε - sqrt(1 - ᾱ_t) g (their Algorithm 2);
`guidance_fn(params, x, t)` returns g.
"""

import jax
import jax.numpy as jnp
import numpy as np

GUIDANCE = ('none', 'classifier', 'classifier_free')


def conditioned_apply(model):
    """(bundle, x, t) -> the U-Net's output, given the bundle's labels if it is conditional."""
    def model_apply(bundle, x, t):
        kwargs = {'y': bundle['labels']} if model.num_classes else {}
        return model.apply({'params': bundle['params']}, x, t, train=False, **kwargs)
    return model_apply


def classifier_free_apply(model):
    """(bundle, x, t) -> (1 + w) ε(x, t, y) - w ε(x, t, ∅), both halves in one call on 2B."""
    if not model.num_classes:
        raise ValueError('classifier-free guidance needs a class-conditional U-Net '
                         '(model.num_classes > 0) trained with label dropout')

    def model_apply(bundle, x, t):
        labels = bundle['labels']
        null = jnp.full_like(labels, model.num_classes)
        out = model.apply({'params': bundle['params']}, jnp.concatenate([x, x]),
                          jnp.concatenate([t, t]), train=False,
                          y=jnp.concatenate([labels, null]))
        cond, uncond = jnp.split(out, 2)
        w = bundle['guidance_scale']
        return (1.0 + w) * cond - w * uncond
    return model_apply


def classifier_gradient(classifier, process):
    """guidance_fn(bundle, x, t) -> s ∇_x log p_φ(y | x_t, t), per sample.

    The samples of a batch are independent under the classifier (GroupNorm is per sample), so
    the gradient of the summed log-probabilities is each sample's own gradient.
    """
    def guidance_fn(bundle, x, t):
        labels = bundle['labels']

        def total_log_prob(x):
            logits = classifier.apply({'params': bundle['classifier']}, x,
                                      process.time_label(t), train=False)
            log_probs = jax.nn.log_softmax(logits)
            return jnp.sum(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))

        return bundle['guidance_scale'] * jax.grad(total_log_prob)(x)
    return guidance_fn


def make_sampling_model(model, process, guidance, classifier=None):
    """(model_apply, guidance_fn or None) for `guidance`; make them once per run (jit statics)."""
    if guidance not in GUIDANCE:
        raise ValueError(f'Unknown sampling.guidance {guidance!r}; valid: {", ".join(GUIDANCE)}')
    if guidance == 'classifier_free':
        return classifier_free_apply(model), None
    if guidance == 'classifier':
        if classifier is None:
            raise ValueError('classifier guidance needs a noise-aware classifier: set '
                             'sampling.classifier_workdir to a run of a task=noisy_classifier '
                             'config')
        return conditioned_apply(model), classifier_gradient(classifier, process)
    return conditioned_apply(model), None


def sample_labels(spec, num_samples, num_classes, rng):
    """The class of each of `num_samples` samples.

    Args:
      spec: 'cycle' (0, 1, ..., K-1, 0, ...), 'random' (uniform, from `rng`) or comma-separated
        classes such as '3' or '1,7', repeated in turn.
      num_classes: K.

    Returns:
      int32 [num_samples].
    """
    if spec == 'cycle':
        return np.arange(num_samples, dtype=np.int32) % num_classes
    if spec == 'random':
        return np.asarray(jax.random.randint(rng, (num_samples,), 0, num_classes), np.int32)
    try:
        classes = np.asarray([int(c) for c in str(spec).split(',')], np.int32)
    except ValueError:
        raise ValueError(f"sampling.labels must be 'cycle', 'random' or comma-separated class "
                         f'numbers, got {spec!r}') from None
    if classes.min() < 0 or classes.max() >= num_classes:
        raise ValueError(f'sampling.labels {spec!r} has a class outside 0..{num_classes - 1}')
    return np.resize(classes, num_samples)

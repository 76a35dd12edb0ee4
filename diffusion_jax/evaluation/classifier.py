"""A small MNIST-5k CNN whose penultimate features stand in for Inception features.

No installed package ships Inception weights, so sample quality on MNIST-5k is measured with
this classifier (trained once by `train_classifier`, weights shipped in `assets/`): the Fréchet
distance of its 128-d features ("FD-MNIST5k", not FID), KID on the same features and a
classifier Inception Score on its logits (see `feature_metrics`).

Weights are stored as a flat npz with '/'-joined parameter paths and loaded with
`allow_pickle=False`.
"""

import functools
import importlib.resources

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

ASSET_PACKAGE = 'diffusion_jax.evaluation'
WEIGHTS_FILE = 'mnist5k_classifier.npz'
STATS_FILE = 'mnist5k_test_stats.npz'
FEATURES_FILE = 'mnist5k_test_features.npz'
INFO_FILE = 'mnist5k_classifier.json'

FEATURE_DIM = 128
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)


class MnistClassifier(nn.Module):
    """conv32 → pool → conv64 → pool → conv32 → pool → dense128 (features) → dense10.

    Input uint8 (or float in [0, 255]) images [N, 28, 28, 1]; they are scaled to [-1, 1].
    Returns (features [N, 128] after ReLU, logits [N, 10]).
    """

    feature_dim: int = FEATURE_DIM
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, images):
        x = images.astype(jnp.float32) / 127.5 - 1.0
        x = nn.relu(nn.Conv(32, (3, 3), name='conv1')(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))                  # 14x14
        x = nn.relu(nn.Conv(64, (3, 3), name='conv2')(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))                  # 7x7
        x = nn.relu(nn.Conv(32, (3, 3), name='conv3')(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')  # 4x4
        x = x.reshape((x.shape[0], -1))
        features = nn.relu(nn.Dense(self.feature_dim, name='features')(x))
        logits = nn.Dense(self.num_classes, name='logits')(features)
        return features, logits


def asset_path(name):
    """A Traversable for a file in `diffusion_jax/evaluation/assets/`."""
    return importlib.resources.files(ASSET_PACKAGE).joinpath('assets', name)


def params_to_flat(params):
    """Param tree → {'conv1/kernel': np.ndarray, ...} (what the npz stores)."""
    flat = traverse_util.flatten_dict(jax.device_get(params), sep='/')
    return {key: np.asarray(value) for key, value in flat.items()}


def flat_to_params(flat):
    """Inverse of `params_to_flat` (values become float32 jnp arrays)."""
    return traverse_util.unflatten_dict(
        {key: jnp.asarray(value, jnp.float32) for key, value in flat.items()}, sep='/')


def save_params(params, path):
    np.savez(path, **params_to_flat(params))


def load_params_file(path_or_file):
    """Reads a weights npz written by `save_params`, without pickle."""
    with np.load(path_or_file, allow_pickle=False) as data:
        return flat_to_params({key: data[key] for key in data.files})


@functools.lru_cache(maxsize=1)
def load_classifier():
    """(module, params) of the shipped MNIST-5k classifier."""
    with asset_path(WEIGHTS_FILE).open('rb') as f:
        params = load_params_file(f)
    return MnistClassifier(), params


@functools.lru_cache(maxsize=None)
def _jitted_apply(module):
    return jax.jit(lambda params, images: module.apply({'params': params}, images))


def features_and_logits(images_uint8, batch_size=500, *, classifier=None):
    """Penultimate features and logits of the classifier, computed in batches.

    Args:
      images_uint8: uint8 [N, 28, 28, 1] (or [N, 28, 28]) images in [0, 255].
      batch_size: images per jitted call; the last batch is zero-padded to this size, so one
        compilation serves every N.
      classifier: optional (module, params); defaults to `load_classifier()`.

    Returns:
      features float32 [N, 128], logits float32 [N, 10] (NumPy).
    """
    module, params = classifier if classifier is not None else load_classifier()
    images = np.asarray(images_uint8)
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f'expected images [N, 28, 28, 1], got {images.shape}')
    if images.dtype != np.uint8:
        raise ValueError(f'expected uint8 images, got {images.dtype}')
    apply = _jitted_apply(module)
    n = images.shape[0]
    batch_size = max(1, min(batch_size, n)) if n else batch_size
    features, logits = [], []
    for start in range(0, n, batch_size):
        batch = images[start:start + batch_size]
        size = batch.shape[0]
        if size < batch_size:
            pad = np.zeros((batch_size - size, *IMAGE_SHAPE), np.uint8)
            batch = np.concatenate([batch, pad])
        f, lg = apply(params, batch)
        features.append(np.asarray(f)[:size])
        logits.append(np.asarray(lg)[:size])
    if not features:
        return (np.zeros((0, module.feature_dim), np.float32),
                np.zeros((0, module.num_classes), np.float32))
    return np.concatenate(features), np.concatenate(logits)

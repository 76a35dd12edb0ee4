"""Trains the MNIST-5k feature classifier once and writes the shipped evaluation assets.

    python -m diffusion_jax.evaluation.train_classifier --data_dir=/tmp/tfds \
        --out_dir=diffusion_jax/evaluation/assets

Writes to `out_dir`:
  mnist5k_classifier.npz      weights, flat '/'-joined keys (loaded without pickle);
  mnist5k_test_stats.npz      mu [128], sigma [128, 128] (float64) of the test-split features;
  mnist5k_test_features.npz   the test-split features themselves (float32, for KID);
  mnist5k_classifier.json     test accuracy, seed, epochs, feature dim, date, ...

The statistics are computed from the weights as re-read from the written npz, through
`classifier.features_and_logits`, i.e. exactly the path the metrics use. Training is
deterministic for a given seed (NumPy shuffling/augmentation, fixed JAX init key) and takes
about a minute or two on two CPU cores.
"""

import datetime
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from diffusion_jax.data import pipeline
from diffusion_jax.evaluation import classifier as classifier_lib

FLAGS = flags.FLAGS
flags.DEFINE_string('data_dir', None, 'tfds data dir (MNIST-5k is built into it if missing).')
flags.DEFINE_string('out_dir', 'diffusion_jax/evaluation/assets', 'Where the assets go.')
flags.DEFINE_integer('seed', 0, 'Seed of the initialization, shuffling and augmentation.')
flags.DEFINE_integer('epochs', 20, 'Training epochs over the 4500 training images.')
flags.DEFINE_integer('batch_size', 64, 'Training batch size.')
flags.DEFINE_float('learning_rate', 1e-3, 'Peak Adam learning rate (cosine decay to 0).')
flags.DEFINE_integer('max_shift', 2, 'Random translation augmentation, in pixels (0: none).')


def shift_augment(images, rng, max_shift):
    """Translates each image by a random integer offset in [-max_shift, max_shift]² (zero fill)."""
    if max_shift == 0:
        return images
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    dy = rng.integers(0, 2 * max_shift + 1, size=n)
    dx = rng.integers(0, 2 * max_shift + 1, size=n)
    out = np.empty_like(images)
    for i in range(n):
        out[i] = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    return out


def make_train_step(module, optimizer):
    def loss_fn(params, images, labels):
        _, logits = module.apply({'params': params}, images)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == labels)

    @jax.jit
    def train_step(params, opt_state, images, labels):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    return train_step


def train(train_images, train_labels, *, seed, epochs, batch_size, learning_rate, max_shift):
    """Returns (module, params) trained on the given uint8 images and labels."""
    module = classifier_lib.MnistClassifier()
    params = module.init(jax.random.PRNGKey(seed),
                         jnp.zeros((1, *classifier_lib.IMAGE_SHAPE), jnp.uint8))['params']
    steps_per_epoch = len(train_images) // batch_size  # drop the remainder: one compiled shape
    schedule = optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch)
    optimizer = optax.adam(schedule)
    opt_state = optimizer.init(params)
    train_step = make_train_step(module, optimizer)
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        start = time.time()
        order = rng.permutation(len(train_images))
        losses, accs = [], []
        for step in range(steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            images = shift_augment(train_images[idx], rng, max_shift)
            params, opt_state, loss, acc = train_step(params, opt_state, images,
                                                      train_labels[idx])
            losses.append(loss)
            accs.append(acc)
        logging.info('epoch %d: loss %.4f, train acc (augmented) %.4f, %.1fs', epoch + 1,
                     float(np.mean(jax.device_get(losses))),
                     float(np.mean(jax.device_get(accs))), time.time() - start)
    return module, params


def feature_stats(features):
    """(mu, sigma) in float64, sigma with the unbiased (N - 1) normalization."""
    features = np.asarray(features, np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def main(argv):
    del argv
    if FLAGS.data_dir is None:
        raise app.UsageError('--data_dir is required')
    start = time.time()
    train_images, train_labels = pipeline.load_split('mnist5k', 'train', data_dir=FLAGS.data_dir)
    test_images, test_labels = pipeline.load_split('mnist5k', 'test', data_dir=FLAGS.data_dir)
    module, params = train(train_images, train_labels, seed=FLAGS.seed, epochs=FLAGS.epochs,
                           batch_size=FLAGS.batch_size, learning_rate=FLAGS.learning_rate,
                           max_shift=FLAGS.max_shift)

    os.makedirs(FLAGS.out_dir, exist_ok=True)
    weights_path = os.path.join(FLAGS.out_dir, classifier_lib.WEIGHTS_FILE)
    classifier_lib.save_params(params, weights_path)
    # Everything below uses the weights as re-read from disk, like the metrics will.
    classifier = (module, classifier_lib.load_params_file(weights_path))
    test_features, test_logits = classifier_lib.features_and_logits(test_images,
                                                                    classifier=classifier)
    _, train_logits = classifier_lib.features_and_logits(train_images, classifier=classifier)
    test_accuracy = float(np.mean(np.argmax(test_logits, -1) == test_labels))
    train_accuracy = float(np.mean(np.argmax(train_logits, -1) == train_labels))
    mu, sigma = feature_stats(test_features)
    np.savez(os.path.join(FLAGS.out_dir, classifier_lib.STATS_FILE), mu=mu, sigma=sigma)
    np.savez_compressed(os.path.join(FLAGS.out_dir, classifier_lib.FEATURES_FILE),
                        features=test_features.astype(np.float32))
    num_params = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
    info = {
        'dataset': 'mnist5k',
        'test_accuracy': test_accuracy,
        'train_accuracy': train_accuracy,
        'num_test': int(len(test_images)),
        'num_train': int(len(train_images)),
        'seed': FLAGS.seed,
        'epochs': FLAGS.epochs,
        'batch_size': FLAGS.batch_size,
        'learning_rate': FLAGS.learning_rate,
        'max_shift': FLAGS.max_shift,
        'feature_dim': int(test_features.shape[1]),
        'num_params': num_params,
        'architecture': classifier_lib.MnistClassifier.__doc__.splitlines()[0],
        'jax_version': jax.__version__,
        'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d'),
    }
    with open(os.path.join(FLAGS.out_dir, classifier_lib.INFO_FILE), 'w') as f:
        json.dump(info, f, indent=2)
        f.write('\n')
    logging.info('test accuracy %.4f, train accuracy %.4f (%d params), %.0fs total',
                 test_accuracy, train_accuracy, num_params, time.time() - start)
    print(json.dumps(info, indent=2))


if __name__ == '__main__':
    app.run(main)

"""FID reference statistics of any configured dataset (the folder one included), cached.

    python -m diffusion_jax.evaluation.reference_stats --config=configs/folder.py \
        --config.data.folder=PATH --config.eval.inception_weights=pt_inception.npz

writes `mu`, `sigma` of the FID Inception's pool3 features over the first
`eval.fid_reference_images` training images (all of them when the split is smaller; the file
records `num_images`, the dataset, the split and the weights' SHA-256) to
`<cache>/<dataset>_<split>_<N>_<weights hash>.npz`, where `<cache>` is `eval.fid_cache_dir`
(default `<data_dir>/fid_reference`), and prints the path. `--mode=eval` with
`eval.inception_weights` and no `eval.fid_reference` makes (or reuses) the same file.
Greyscale images are repeated to RGB, as for the samples. Published FIDs use the whole training
set (CIFAR-10: 50,000 images) and 50,000 samples; see docs/fid.md.
"""

import hashlib
import os

from absl import logging

from diffusion_jax.data import folder as folder_lib
from diffusion_jax.data import pipeline as data_pipeline
from diffusion_jax.evaluation import fid

DEFAULT_DATA_DIR = os.path.join('~', 'tensorflow_datasets')


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def dataset_name(config):
    """A name for the configured dataset and its preprocessing (the folder's fingerprint)."""
    data = config.data
    if data.name == 'folder':
        return 'folder_' + folder_lib.folder_config(
            data.folder, image_size=data.image_size, channels=data.channels).name
    return f'{data.name}_{data.image_size}px'


def reference_path(config, split='train', weights_sha256=None):
    """Where `ensure_reference` keeps the statistics for `config`."""
    e = config.eval
    cache = e.get('fid_cache_dir') or os.path.join(config.data.data_dir or DEFAULT_DATA_DIR,
                                                   'fid_reference')
    weights = (weights_sha256 or file_sha256(os.path.expanduser(e.inception_weights)))[:12]
    name = f'{dataset_name(config)}_{split}_{e.fid_reference_images}_{weights}.npz'
    return os.path.join(os.path.expanduser(cache), name)


def ensure_reference(config, split='train'):
    """The path of `config`'s reference statistics, computed first if not cached."""
    if not config.eval.inception_weights:
        raise ValueError('reference statistics need the FID Inception weights: set '
                         '--config.eval.inception_weights (scripts/convert_inception_weights.py)')
    weights_sha256 = file_sha256(os.path.expanduser(config.eval.inception_weights))
    path = reference_path(config, split, weights_sha256)
    if os.path.exists(path):
        logging.info('FID reference statistics: %s (cached)', path)
        return path
    from diffusion_jax.evaluation import inception
    images, _ = data_pipeline.load_configured_split(config.data, split)
    images = fid.as_rgb(images[:config.eval.fid_reference_images])
    apply_fn = inception.build_apply_fn(inception.load_params(config.eval.inception_weights))
    mu, sigma = fid.compute_statistics(images, apply_fn, config.eval.inception_batch_size)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = path + '.partial.npz'  # Renamed when complete: a cut-off run leaves no bad cache.
    fid.save_statistics(partial, mu, sigma, num_images=len(images),
                        dataset=dataset_name(config), split=split,
                        inception_weights_sha256=weights_sha256)
    os.replace(partial, path)
    logging.info('FID reference statistics of %d %s images: %s', len(images), split, path)
    return path


def main(argv):
    from diffusion_jax import config_cli
    del argv
    config_cli.setup_logging()
    print(ensure_reference(config_cli.FLAGS.config))


if __name__ == '__main__':
    from diffusion_jax import config_cli
    config_cli.run(main, required=('config',))

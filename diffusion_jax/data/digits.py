"""scikit-learn's 8x8 handwritten digits (1,797 images, 17 grey levels): the fastest real data."""

import numpy as np
import tensorflow_datasets as tfds

from diffusion_jax.data.builder_helpers import (
    TEST_SHARE, image_label_info, labelled_examples, stratified_split)

IMAGE_SHAPE = (8, 8, 1)
# Fixed forever: changing it changes which rows are test images.
SPLIT_SEED = 0


def read_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """Loads `sklearn.datasets.load_digits` (bundled with scikit-learn, no download).

    Returns:
      images uint8 [1797, 8, 8, 1], grey levels 0..16 mapped by round(v * 255 / 16) (NumPy's
      round-half-to-even; only v = 8 lands on a half, giving 128), and labels int64 [1797].
    """
    # Imported here: scikit-learn is slow to import and only needed when building.
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)
    return images[..., None], digits.target.astype(np.int64)


class Digits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """8x8 digits as a tfds builder: 1,621 train / 176 test (1 in 10 per class, rounded down).

    Not registered with tfds (see `diffusion_jax.data.builders`); instantiate it directly.
    """

    name = "digits"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return image_label_info(
            self, shape=IMAGE_SHAPE,
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
            description=(
                "scikit-learn's 8x8 digits, values 0..16 scaled to uint8 by round(v * 255 / 16). "
                f"Split: for each class, 1 in {TEST_SHARE} rows chosen by "
                f"np.random.default_rng([{SPLIT_SEED}, class]) go to test."))

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data is in scikit-learn.
        images, labels = read_sklearn_digits()
        train, test = stratified_split(labels, seed=SPLIT_SEED)
        return {
            "train": self._generate_examples(images, labels, train),
            "test": self._generate_examples(images, labels, test),
        }

    def _generate_examples(self, images, labels, rows):
        yield from labelled_examples(images, labels, rows, shape=IMAGE_SHAPE)

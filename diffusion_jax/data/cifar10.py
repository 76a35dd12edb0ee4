"""CIFAR-10 from the official binary archive, placed by hand (these machines have no internet).

The builder is named `cifar10_manual` because tfds already has a builtin `cifar10` (which
downloads the Python-pickle version).
"""

import tarfile

import numpy as np
import tensorflow_datasets as tfds

from diffusion_jax import errors
from diffusion_jax.data.builder_helpers import image_label_info, labelled_examples

ARCHIVE_NAME = "cifar-10-binary.tar.gz"
TRAIN_MEMBERS = tuple(f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6))
TEST_MEMBERS = ("cifar-10-batches-bin/test_batch.bin",)
IMAGE_SHAPE = (32, 32, 3)
# Each record: 1 label byte, then the 1024 R, 1024 G and 1024 B bytes of a 32x32 image.
RECORD_BYTES = 1 + 32 * 32 * 3
LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck")


def decode_cifar_records(data: bytes, *, source: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Decodes the records of one CIFAR-10 binary batch file.

    Args:
      data: the file's bytes, a whole number of 3,073-byte records.
      source: file name for error messages.

    Returns:
      images uint8 [n, 32, 32, 3] (HWC, RGB) and labels int64 [n].
    """
    if len(data) % RECORD_BYTES:
        raise ValueError(
            f"{source}: {len(data)} bytes is not a whole number of {RECORD_BYTES}-byte records")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.size and labels.max() >= len(LABEL_NAMES):
        raise ValueError(f"{source}: label {labels.max()} out of range 0..9")
    planes = records[:, 1:].reshape(-1, 3, 32, 32)  # channel-major in the file
    return np.ascontiguousarray(planes.transpose(0, 2, 3, 1)), labels


def read_cifar_archive(archive, members: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Reads and concatenates the given batch files from `cifar-10-binary.tar.gz`.

    Args:
      archive: path to the archive (str or path-like).
      members: member names inside the archive, read in this order.

    Returns:
      images uint8 [N, 32, 32, 3] and labels int64 [N].
    """
    contents = {}
    # One pass over the archive: gzip cannot seek, so looking members up by name would
    # decompress it again for each one.
    with tarfile.open(archive, mode="r:gz") as tar:
        for info in tar:
            if info.name in members:
                contents[info.name] = tar.extractfile(info).read()
    missing = [member for member in members if member not in contents]
    if missing:
        raise ValueError(f"{archive} lacks members {missing}")
    decoded = [decode_cifar_records(contents[member], source=member) for member in members]
    images, labels = zip(*decoded)
    return np.concatenate(images), np.concatenate(labels)


class Cifar10Manual(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """CIFAR-10 (50,000 train / 10,000 test) from a manually placed `cifar-10-binary.tar.gz`.

    Not registered with tfds (see `diffusion_jax.data.builders`); instantiate it directly.
    """

    name = "cifar10_manual"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Download the CIFAR-10 *binary version*, {ARCHIVE_NAME} (about 162 MB), from
    https://www.cs.toronto.edu/~kriz/cifar.html and put the archive itself, not extracted, at
    `<manual_dir>/{ARCHIVE_NAME}`. manual_dir is the `manual_dir` argument of
    `diffusion_jax.data.load_split` (or `tfds.download.DownloadConfig(manual_dir=...)`) and
    defaults to `<data_dir>/downloads/manual/`.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return image_label_info(
            self, shape=IMAGE_SHAPE, label_names=LABEL_NAMES,
            homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
            description="CIFAR-10 from the official binary archive (32x32 RGB, 10 classes).")

    def _split_generators(self, dl_manager):
        archive = _manual_archive(dl_manager)
        return {
            "train": self._generate_examples(archive, TRAIN_MEMBERS),
            "test": self._generate_examples(archive, TEST_MEMBERS),
        }

    def _generate_examples(self, archive, members):
        images, labels = read_cifar_archive(archive, members)
        yield from labelled_examples(images, labels, np.arange(len(labels)), shape=IMAGE_SHAPE)


def _manual_archive(dl_manager):
    """Returns the archive's path in the manual dir, or raises an error naming where it belongs."""
    try:
        manual_dir = dl_manager.manual_dir
    except AssertionError as err:
        # tfds asserts when the manual dir is missing or empty; its message names the directory.
        raise errors.MissingInputError(
            f"CIFAR-10 archive not found: {ARCHIVE_NAME} belongs in the manual dir. {err}"
        ) from err
    archive = manual_dir / ARCHIVE_NAME
    if not archive.exists():
        raise errors.MissingInputError(
            f"CIFAR-10 archive not found: expected {archive}."
            f"{Cifar10Manual.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return archive

"""Pieces shared by the tfds builders: stratified splits and TF-free image encoding.

Why PIL images: `tfds.features.Image` encodes an ndarray with `tf.image.encode_png`, which needs
TensorFlow. Given a `PIL.Image` it encodes with PIL instead, and `as_data_source()` decodes the
stored PNG bytes with OpenCV or, failing that, PIL. So writing and reading never touch TF.
"""

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

# One row in TEST_SHARE of every class goes to the test split (rounded down per class).
TEST_SHARE = 10


def stratified_split(labels: np.ndarray, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits row indices into train and test, class by class, reproducibly.

    The rule: for each class c in ascending order, the row indices with label c (in source order)
    are permuted by `np.random.default_rng([seed, c])`; the first `count_c // TEST_SHARE` of them
    go to test, the rest to train. Seeding per class keeps each class's choice independent of the
    others' counts.

    Args:
      labels: integer labels [N] in source order.
      seed: split seed; a builder fixes it so its splits never change.

    Returns:
      (train_indices, test_indices), each sorted ascending.
    """
    labels = np.asarray(labels)
    train_parts, test_parts = [], []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        shuffled = np.random.default_rng([seed, int(c)]).permutation(rows)
        n_test = len(rows) // TEST_SHARE
        test_parts.append(shuffled[:n_test])
        train_parts.append(shuffled[n_test:])
    return np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(test_parts))


def to_pil_image(image: np.ndarray, *, shape: tuple[int, int, int]) -> Image.Image:
    """Wraps a uint8 HWC array as a PIL image that `tfds.features.Image` can encode without TF.

    The feature does not check the shape of PIL inputs, so it is checked here.

    Args:
      image: uint8 array [H, W, C] with C in {1, 3}.
      shape: the builder's declared (H, W, C).

    Returns:
      A greyscale ('L') or 'RGB' PIL image.
    """
    if image.dtype != np.uint8 or image.shape != tuple(shape):
        raise ValueError(
            f"expected a uint8 image of shape {tuple(shape)}, got {image.dtype} {image.shape}")
    # PIL infers the mode from a uint8 array: 2-D -> 'L', [H, W, 3] -> 'RGB'.
    return Image.fromarray(image[..., 0] if shape[-1] == 1 else image)


def labelled_examples(images: np.ndarray, labels: np.ndarray, rows: np.ndarray, *,
                      shape: tuple[int, int, int]):
    """Yields tfds `(key, example)` pairs for the chosen source rows.

    Args:
      images: uint8 [N, H, W, C] in source order.
      labels: integer labels [N].
      rows: which source rows to emit; the row number is the (unique, stable) key.
      shape: the builder's declared image shape (H, W, C).

    Yields:
      (row, {"image": PIL image, "label": int}).
    """
    for row in rows:
        yield int(row), {
            "image": to_pil_image(images[row], shape=shape),
            "label": int(labels[row]),
        }


def image_label_info(builder, *, shape: tuple[int, int, int], description: str, homepage: str,
                     label_names: tuple[str, ...] | None = None) -> tfds.core.DatasetInfo:
    """The `DatasetInfo` of an (image, label) builder with PNG-encoded images.

    Built directly: `dataset_info_from_configs` would look for metadata files (README,
    CITATIONS.bib) beside the builder's module.

    Args:
      builder: the builder instance (`self` in `_info`).
      shape: the image shape (H, W, C).
      description, homepage: shown by tfds.
      label_names: class names, or None for 10 unnamed classes.
    """
    label = (tfds.features.ClassLabel(names=list(label_names)) if label_names
             else tfds.features.ClassLabel(num_classes=10))
    return tfds.core.DatasetInfo(
        builder=builder,
        description=description,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=shape, encoding_format="png"),
            "label": label,
        }),
        supervised_keys=("image", "label"),
        homepage=homepage,
    )

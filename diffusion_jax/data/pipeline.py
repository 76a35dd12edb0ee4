"""From a prepared tfds split to deterministic, resumable training batches.

Reading goes through `builder.as_data_source()` (array_record, random access, no TensorFlow).
The datasets here fit in host memory, so a split is read once into NumPy and batches are cut from
it by `InputPipeline`, whose batch k depends only on (seed, k): resuming needs nothing but k.
"""

from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from diffusion_jax import errors
from diffusion_jax.data import folder as folder_lib
from diffusion_jax.data.builders import BUILDERS


def make_builder(name: str, *, data_dir: str,
                 builder_config: tfds.core.BuilderConfig | None = None) -> tfds.core.DatasetBuilder:
    """Instantiates one of our builders, writing array_record files under `data_dir`.

    Args:
      name: a key of `BUILDERS` ("mnist5k", "digits", "cifar10", "folder").
      data_dir: tfds data directory.
      builder_config: the builder's config ("folder" needs `folder.folder_config(...)`).

    Returns:
      The (possibly not yet prepared) builder.

    Raises:
      ValueError: unknown name; the message lists the valid ones.
    """
    if name not in BUILDERS:
        raise errors.ConfigError(f"unknown dataset {name!r}; valid names: {sorted(BUILDERS)}")
    kwargs = {"config": builder_config} if builder_config is not None else {}
    return BUILDERS[name](data_dir=data_dir, file_format="array_record", **kwargs)


def load_configured_split(data, split: str, *, num_classes: int = 0):
    """`load_split` for a config's `data` block (the folder dataset takes its options from it)."""
    builder_config = None
    if data.name == "folder":
        builder_config = folder_lib.folder_config(
            data.get("folder"), image_size=data.image_size, channels=data.channels,
            num_classes=num_classes)
    return load_split(data.name, split, data_dir=data.data_dir, manual_dir=data.manual_dir,
                      builder_config=builder_config)


def load_split(name: str, split: str, *, data_dir: str, manual_dir: str | None = None,
               builder_config: tfds.core.BuilderConfig | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Prepares a dataset if needed and reads one split completely into memory.

    Preparing is idempotent: once `data_dir` holds the dataset, it is only read.

    Args:
      name: dataset name, a key of `BUILDERS`.
      split: tfds split, e.g. "train", "test" or "train[:10%]".
      data_dir: tfds data directory.
      manual_dir: where manually placed archives are (CIFAR-10); defaults to
        `<data_dir>/downloads/manual`.
      builder_config: passed to `make_builder`.

    Returns:
      images uint8 [N, H, W, C] and labels int32 [N], in the data source's order.
    """
    builder = make_builder(name, data_dir=data_dir, builder_config=builder_config)
    builder.download_and_prepare(
        file_format="array_record",
        # Never look for a prepared copy on GCS: the machines have no internet, and the probe's
        # error handling touches TensorFlow. (tfds keeps GCS off by default; this makes it sure.)
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir,
                                                     try_download_gcs=False),
    )
    image_shape = builder.info.features["image"].shape
    return _read_all(builder.as_data_source(split), image_shape=image_shape)


def _read_all(source, *, image_shape) -> tuple[np.ndarray, np.ndarray]:
    """Decodes every record of a data source into preallocated arrays."""
    images = np.empty((len(source), *image_shape), dtype=np.uint8)
    labels = np.empty((len(source),), dtype=np.int32)
    # Record by record: the batched `__getitems__` is only ~20% faster and is broken under
    # `tfds.testing.mock_data` (its mock is installed without binding `self`).
    for i, example in enumerate(source):
        images[i] = example["image"]
        labels[i] = example["label"]
    return images, labels


def check_images(images: np.ndarray, *, image_size: int, channels: int) -> None:
    """Checks that dataset images match the configured resolution and channel count.

    Args:
      images: array [N, H, W, C].
      image_size: the config's H (= W).
      channels: the config's C.

    Raises:
      ValueError: naming the expected and actual per-image shape.
    """
    expected = (image_size, image_size, channels)
    actual = tuple(np.shape(images))[1:]
    if np.ndim(images) != 4 or actual != expected:
        raise errors.ConfigError(
            f"dataset images have shape {actual} (array {tuple(np.shape(images))}) but the "
            f"config expects {expected} (image_size={image_size}, channels={channels})")


class InputPipeline:
    """Deterministic, resumable iterator over training batches, split across processes.

    The rule: global batch k belongs to epoch e = k // batches_per_epoch and holds the examples
    `np.random.default_rng([seed, e]).permutation(N)[i * B:(i + 1) * B]` with i = k mod
    batches_per_epoch (the last N mod B of each permutation are dropped). With `random_flip`,
    each of its B images is mirrored left-right when `np.random.default_rng([seed, e, k])
    .random(B) < 0.5`. Process p of P returns rows [p * B / P, (p + 1) * B / P) of that global
    batch, so the global batch does not depend on the number of processes.

    Batches are {"image": float32 [B / P, H, W, C] in [-1, 1] (x / 127.5 - 1),
    "label": int32 [B / P]}.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, global_batch_size: int,
                 seed: int, random_flip: bool, process_index: int = 0, process_count: int = 1):
        """Creates the pipeline at batch 0.

        Args:
          images: uint8 [N, H, W, C].
          labels: integer labels [N].
          global_batch_size: B, summed over processes; at most N, divisible by process_count.
          seed: data-order seed.
          random_flip: mirror images left-right with probability 1/2.
          process_index: this process, in [0, process_count).
          process_count: number of processes sharing each global batch.
        """
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} "
                             f"{images.shape}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{len(images)} images but labels of shape {labels.shape}")
        num_examples = len(images)
        if not 0 < global_batch_size <= num_examples:
            raise errors.ConfigError(
                f"global_batch_size must be in [1, {num_examples}] (the number of "
                f"examples), got {global_batch_size}")
        if global_batch_size % process_count:
            raise errors.ConfigError(f"global_batch_size {global_batch_size} is not divisible by "
                                     f"process_count {process_count}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (it seeds np.random.default_rng), got {seed}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self._images = images
        self._labels = labels.astype(np.int32)
        # Plain ints keep `get_state` JSON-serialisable when configs hand in NumPy integers.
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.random_flip = random_flip
        self.batches_per_epoch = num_examples // global_batch_size
        per_process = global_batch_size // process_count
        self._rows = slice(process_index * per_process, (process_index + 1) * per_process)
        self._next_batch = 0
        self._cached_epoch = None
        self._cached_permutation = None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self.next()

    def next(self) -> dict[str, np.ndarray]:
        """Returns this process's part of the next global batch and advances.

        Returns:
          {"image": float32 [B / P, H, W, C] in [-1, 1], "label": int32 [B / P]}.
        """
        batch = self.batch(self._next_batch)
        self._next_batch += 1
        return batch

    def batch(self, k: int) -> dict[str, np.ndarray]:
        """Returns this process's part of global batch k, without changing the position.

        Args:
          k: global batch number, >= 0.

        Returns:
          {"image": float32 [B / P, H, W, C] in [-1, 1], "label": int32 [B / P]}.
        """
        if k < 0:
            raise ValueError(f"batch number must be >= 0, got {k}")
        epoch, index_in_epoch = divmod(k, self.batches_per_epoch)
        start = index_in_epoch * self.global_batch_size
        rows = self._permutation(epoch)[start:start + self.global_batch_size][self._rows]
        images = self._images[rows]
        if self.random_flip:
            # Drawn for the whole global batch, then sliced, so every process agrees.
            flip = np.random.default_rng([self.seed, epoch, k]).random(self.global_batch_size)
            flip = flip[self._rows] < 0.5
            images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
        return {
            "image": images.astype(np.float32) / 127.5 - 1.0,
            "label": self._labels[rows],
        }

    def _permutation(self, epoch: int) -> np.ndarray:
        # Consecutive batches share an epoch, so the last permutation is kept.
        if epoch != self._cached_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._cached_permutation = rng.permutation(len(self._images))
            self._cached_epoch = epoch
        return self._cached_permutation

    def get_state(self) -> dict[str, Any]:
        """Returns the position as a JSON-serialisable dict (store it with the checkpoint).

        Returns:
          {"next_batch", "seed", "global_batch_size", "num_examples"}; the last three only
          guard against resuming a different data order.
        """
        return {
            "next_batch": self._next_batch,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_examples": len(self._images),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Resumes at a position from `get_state`; the process count may differ.

        Args:
          state: a dict from `get_state` ("global_batch_size" and "num_examples" are checked
            when present).

        Raises:
          ValueError: the state belongs to a different seed, batch size or dataset size, so
            resuming would not continue the same sequence of batches.
        """
        current = self.get_state()
        if "next_batch" not in state or "seed" not in state:
            raise ValueError(f"a pipeline state needs 'next_batch' and 'seed', got {state!r}")
        for key in ("seed", "global_batch_size", "num_examples"):
            if key in state and state[key] != current[key]:
                raise errors.ConfigError(
                    f"cannot resume: the saved state has {key}={state[key]!r} but "
                    f"this pipeline has {key}={current[key]!r}")
        next_batch = int(state["next_batch"])
        if next_batch < 0:
            raise ValueError(f"next_batch must be >= 0, got {next_batch}")
        self._next_batch = next_batch

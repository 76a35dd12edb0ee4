"""The folder dataset: preprocessing against a NumPy reference, the split rule, the fingerprint,
a tiny run on a folder the test writes (train, sample, bits/dim, resume), and bad folders."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import file_digests, run_python
from configs import tiny
from diffusion_jax import train
from diffusion_jax.data import folder as folder_lib
from diffusion_jax.data import pipeline

RNG = np.random.default_rng(0)


def write_image(path, array, mode=None, **save_kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path, **save_kwargs)


def write_folder(root, per_class=6):
    """Two classes of mixed sizes, modes and formats, plus a corrupt file and a text file."""
    for c, name in enumerate(['rings', 'bars']):
        for i in range(per_class):
            h, w = [(12, 20), (30, 16), (9, 9)][i % 3]
            pixels = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
            if i % 2:
                write_image(root / name / f'{i}.png', pixels[..., 0], 'L')
            else:
                write_image(root / name / f'{i}.jpg', pixels, quality=95)
    write_image(root / 'bars' / 'alpha.webp',
                RNG.integers(0, 256, (10, 14, 4), dtype=np.uint8), lossless=True)
    (root / 'rings' / 'broken.png').write_bytes(b'not an image at all')
    (root / 'rings' / 'notes.txt').write_text('ignored: not an image extension')
    return root


def test_load_image_matches_a_numpy_resize_and_centre_crop(tmp_path):
    # 8x20 greyscale: the short side (8) is the target size, so no resampling, only the crop of
    # columns 6..13 -- exactly what NumPy slicing gives.
    pixels = RNG.integers(0, 256, (8, 20), dtype=np.uint8)
    write_image(tmp_path / 'a.png', pixels, 'L')
    got = folder_lib.load_image(tmp_path / 'a.png', image_size=8, channels=1)
    np.testing.assert_array_equal(got[..., 0], pixels[:, 6:14])
    # RGB to greyscale: PIL's ITU-R 601 luma, L = (299 R + 587 G + 114 B) / 1000, rounded.
    rgb = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    write_image(tmp_path / 'b.png', rgb)
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    got = folder_lib.load_image(tmp_path / 'b.png', image_size=8, channels=1)[..., 0]
    assert np.abs(got.astype(np.float64) - luma).max() <= 1.0
    # A constant image stays constant through the bicubic downsampling of a 40x30 source; a
    # transparent one is composited on white.
    write_image(tmp_path / 'c.png', np.full((30, 40, 3), 77, np.uint8))
    got = folder_lib.load_image(tmp_path / 'c.png', image_size=6, channels=3)
    assert got.shape == (6, 6, 3) and np.all(got == 77)
    write_image(tmp_path / 'd.png', np.zeros((5, 5, 4), np.uint8))
    assert np.all(folder_lib.load_image(tmp_path / 'd.png', image_size=5, channels=3) == 255)


@pytest.mark.parametrize('counts', [[1, 2, 9, 10, 11, 25], [3], [40, 7]])
def test_split_rows_holds_out_ceil_tenth_of_every_class(counts):
    labels = RNG.permutation(np.repeat(np.arange(len(counts)), counts))
    train_rows, test_rows = folder_lib.split_rows(labels)
    assert sorted(np.concatenate([train_rows, test_rows]).tolist()) == list(range(len(labels)))
    for c, n in enumerate(counts):
        expected = 0 if n < 2 else int(np.ceil(n / 10))
        assert np.sum(labels[test_rows] == c) == expected
    np.testing.assert_array_equal(folder_lib.split_rows(labels)[1], test_rows)  # Reproducible.


def test_fingerprint_follows_the_files_and_the_preprocessing(tmp_path):
    root = write_folder(tmp_path / 'images')
    config = folder_lib.folder_config(str(root), image_size=8, channels=1, num_classes=2)
    assert config.class_names == ('bars', 'rings')
    assert 'rings/notes.txt' not in config.files and 'rings/broken.png' in config.files
    same = folder_lib.folder_config(str(root), image_size=8, channels=1)
    assert same.name == config.name
    assert folder_lib.folder_config(str(root), image_size=8, channels=3).name != config.name
    write_image(root / 'bars' / 'new.png', np.zeros((9, 9), np.uint8), 'L')
    assert folder_lib.folder_config(str(root), image_size=8, channels=1).name != config.name


def test_prepared_splits_hold_every_readable_image_with_its_label(tmp_path):
    root = write_folder(tmp_path / 'images')
    config = folder_lib.folder_config(str(root), image_size=8, channels=1)
    splits = {s: pipeline.load_split('folder', s, data_dir=str(tmp_path / 'tfds'),
                                     builder_config=config) for s in ('train', 'test')}
    labels = np.concatenate([splits['train'][1], splits['test'][1]])
    # 6 + 1 (webp) bars with label 0, 6 rings (broken.png skipped) with label 1.
    assert np.bincount(labels).tolist() == [7, 6]
    assert np.bincount(splits['test'][1]).tolist() == [1, 1]
    expected = folder_lib.load_image(root / 'rings' / '1.png', image_size=8, channels=1)
    every_image = np.concatenate([splits['train'][0], splits['test'][0]])
    assert any(np.array_equal(image, expected) for image in every_image)


def folder_command(workdir, folder, data_dir, *overrides):
    return ['-m', 'diffusion_jax.main', '--config=configs/tiny.py', f'--workdir={workdir}',
            '--config.data.name=folder', f'--config.data.folder={folder}',
            f'--config.data.data_dir={data_dir}', '--config.training.batch_size=8',
            '--config.training.checkpoint_every=2', '--config.sampling.num_samples=8',
            '--config.sampling.batch_size=8', '--config.model.num_classes=2', *overrides]


@pytest.fixture(scope='module')
def folder_run(tmp_path_factory):
    """A tiny class-conditional model trained 4 steps on a written folder, then resumed to 6."""
    base = tmp_path_factory.mktemp('folder_run')
    root = write_folder(base / 'images')
    workdir, data_dir = base / 'run', base / 'tfds'
    first = run_python(folder_command(workdir, root, data_dir,
                                      '--config.training.num_train_steps=4'), fast_compiles=True)
    resumed = run_python(folder_command(workdir, root, data_dir,
                                        '--config.training.num_train_steps=6'), fast_compiles=True)
    return dict(root=root, workdir=workdir, data_dir=data_dir, first=first, resumed=resumed)


def test_a_folder_trains_samples_resumes_and_evaluates(folder_run):
    workdir = folder_run['workdir']
    assert 'Skipped 1 file(s)' in folder_run['first'].stderr
    assert 'rings/broken.png' in folder_run['first'].stderr
    assert 'Restored checkpoint at step 4' in folder_run['resumed'].stderr, (
        folder_run['resumed'].stderr[-3000:])
    rows = (workdir / 'metrics.jsonl').read_text().splitlines()
    steps = [json.loads(line)['step'] for line in rows if '"loss"' in line]
    assert max(steps) == 6
    names = json.loads((workdir / 'class_names.json').read_text())
    assert names['labels'] == {'0': 'bars', '1': 'rings'}
    with np.load(workdir / 'samples.npz') as samples:
        assert samples['images'].shape == (8, 8, 8, 1)
    run_python(folder_command(workdir, folder_run['root'], folder_run['data_dir'],
                              '--config.training.num_train_steps=6', '--mode=eval',
                              '--config.eval.num_images=2', '--config.eval.batch_size=2'),
               fast_compiles=True)
    results = json.loads((workdir / 'eval.json').read_text())
    assert results['num_images'] == 2 and 0 < results['bits_per_dim'] < 30


def empty_folder(tmp_path, _):
    (tmp_path / 'empty').mkdir()
    return tmp_path / 'empty', 0


def only_text(tmp_path, _):
    (tmp_path / 'text').mkdir()
    (tmp_path / 'text' / 'a.txt').write_text('x')
    return tmp_path / 'text', 0


def only_corrupt(tmp_path, _):
    (tmp_path / 'bad' / 'a').mkdir(parents=True)
    (tmp_path / 'bad' / 'a' / 'x.png').write_bytes(b'garbage')
    (tmp_path / 'bad' / 'b').mkdir()
    (tmp_path / 'bad' / 'b' / 'y.jpg').write_bytes(b'garbage')
    return tmp_path / 'bad', 2


def labels_without_subfolders(tmp_path, _):
    write_image(tmp_path / 'flat' / 'a.png', np.zeros((8, 8), np.uint8), 'L')
    return tmp_path / 'flat', 2


def wrong_class_count(tmp_path, run):
    copy = tmp_path / 'three'
    shutil.copytree(run['root'], copy)
    write_image(copy / 'third' / 'a.png', np.zeros((8, 8), np.uint8), 'L')
    return copy, 2


BAD_FOLDERS = {
    'missing': (lambda tmp_path, _: (tmp_path / 'nowhere', 0), 'is not a directory'),
    'empty': (empty_folder, 'holds no image files'),
    'no_images': (only_text, 'holds no image files'),
    'undecodable': (only_corrupt, 'no readable images'),
    'labels_without_subfolders': (labels_without_subfolders, 'has no subfolders'),
    'wrong_class_count': (wrong_class_count, r"model.num_classes=2 but .* has 3 class subfolders"),
}


@pytest.mark.parametrize('case', sorted(BAD_FOLDERS))
def test_a_bad_folder_names_the_problem_and_keeps_the_run(folder_run, tmp_path, case):
    make, message = BAD_FOLDERS[case]
    folder, num_classes = make(tmp_path, folder_run)
    workdir = folder_run['workdir']
    before = file_digests(workdir)
    config = tiny.get_config()
    config.data.update(name='folder', folder=str(folder), data_dir=str(tmp_path / 'tfds'))
    config.model.num_classes = num_classes
    config.training.num_train_steps = 8
    with pytest.raises(folder_lib.FolderError, match=message):
        train.train_and_evaluate(config, str(workdir))
    assert file_digests(workdir) == before

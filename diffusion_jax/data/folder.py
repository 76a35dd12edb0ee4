"""A folder of the user's images as a tfds builder (`data.name=folder`, `data.folder=PATH`).

Every PNG, JPEG, WebP and BMP file under the folder (recursively) is one example. Images are
converted to the configured channels (PIL mode 'L' or 'RGB'; an alpha channel is composited on
white), resized so the short side is `image_size` (PIL's antialiased bicubic), and centre-cropped
to a square. The first-level subfolders, sorted by name, are the class labels 0..K-1 (images
directly in the folder get label 0 when there are no subfolders). A file with an image extension
that PIL cannot decode is skipped, named in a warning and counted in the dataset's description;
files with other extensions are ignored.

The test split holds ceil(n_c / 10) images of every class c that has at least two (chosen per
class by `np.random.default_rng([0, c])`), the rest are training images.

The builder config's name is a fingerprint of the file list (relative paths, sizes and
modification times) and of the preprocessing, so a prepared copy is reused until the folder or
the preprocessing changes, and a changed folder is prepared again under a new name.
"""

import dataclasses
import hashlib
import logging
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from PIL import Image

from diffusion_jax import errors
from diffusion_jax.data.builder_helpers import labelled_examples

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp')
TEST_SHARE = 10
SPLIT_SEED = 0
VERSION = tfds.core.Version('1.0.0')


class FolderError(errors.UserError, ValueError):
    """The folder cannot be made into a dataset (the message names why and the fix)."""


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
    """What `ImageFolder` prepares: the folder, its files and the preprocessing."""
    folder: str = ''
    image_size: int = 32
    channels: int = 3
    files: tuple[str, ...] = ()  # Relative paths, sorted.
    class_names: tuple[str, ...] = ()  # Sorted first-level subfolders; () when there are none.


def list_images(folder: str) -> list[str]:
    """Relative paths (sorted, '/'-separated) of the image files under `folder`."""
    root = pathlib.Path(folder)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
        for name in filenames:
            if not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append((pathlib.Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(found)


def folder_config(folder: str, *, image_size: int, channels: int,
                  num_classes: int = 0) -> FolderConfig:
    """Checks the folder and names the builder config after its fingerprint.

    Args:
      folder: the directory of images.
      image_size: the square side images are resized and cropped to.
      channels: 1 (greyscale) or 3 (RGB).
      num_classes: the model's class count; > 0 needs that many first-level subfolders.

    Raises:
      FolderError: the folder is not set, missing, has no image files, or its subfolders do not
        match `num_classes`.
    """
    if not folder:
        raise FolderError('data.name=folder needs --config.data.folder=PATH, a directory of images')
    root = pathlib.Path(folder).expanduser()
    if not root.is_dir():
        raise FolderError(f'data.folder {str(root)!r} is not a directory')
    if channels not in (1, 3):
        raise FolderError(f'data.channels must be 1 (greyscale) or 3 (RGB), got {channels}')
    files = list_images(str(root))
    if not files:
        raise FolderError(f'data.folder {str(root)!r} holds no image files '
                          f'({", ".join(IMAGE_EXTENSIONS)})')
    class_names = tuple(sorted({f.split('/')[0] for f in files if '/' in f}))
    if num_classes:
        if not class_names:
            raise FolderError(f'model.num_classes={num_classes} asks for labels, but {str(root)!r} '
                              'has no subfolders: put each class in its own subfolder')
        if any('/' not in f for f in files):
            raise FolderError(f'model.num_classes={num_classes}: some images lie directly in '
                              f'{str(root)!r}; with labels, each image goes in a class subfolder')
        if len(class_names) != num_classes:
            raise FolderError(f'model.num_classes={num_classes} but {str(root)!r} has '
                              f'{len(class_names)} class subfolders {list(class_names)}')
    digest = hashlib.sha256(f'{VERSION} {image_size} {channels}'.encode())
    for name in files:
        stat = (root / name).stat()
        digest.update(f'\0{name}\0{stat.st_size}\0{stat.st_mtime_ns}'.encode())
    return FolderConfig(name=f'{image_size}px_{channels}ch_{digest.hexdigest()[:16]}',
                        version=VERSION, folder=str(root.resolve()), image_size=image_size,
                        channels=channels, files=tuple(files), class_names=class_names)


def load_image(path: pathlib.Path, *, image_size: int, channels: int) -> np.ndarray:
    """Decodes, converts, resizes the short side to `image_size`, centre-crops: uint8 [H, W, C]."""
    with Image.open(path) as image:
        image.load()
        if image.mode in ('RGBA', 'LA', 'PA') or 'transparency' in image.info:
            rgba = image.convert('RGBA')
            image = Image.alpha_composite(Image.new('RGBA', rgba.size, 'white'), rgba)
        image = image.convert('L' if channels == 1 else 'RGB')
    width, height = image.size
    scale = image_size / min(width, height)
    size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image, np.uint8).reshape(image_size, image_size, channels)


def split_rows(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row indices: ceil(n_c / 10) test rows of every class with n_c >= 2."""
    train, test = [], []
    for c in np.unique(labels):
        rows = np.random.default_rng([SPLIT_SEED, int(c)]).permutation(np.flatnonzero(labels == c))
        n_test = -(-len(rows) // TEST_SHARE) if len(rows) >= 2 else 0
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


class ImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A folder of images; instantiate with `config=folder_config(...)`."""

    name = 'image_folder'
    VERSION = VERSION
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        shape = (config.image_size, config.image_size, config.channels)
        names = list(config.class_names) or ['all']
        return tfds.core.DatasetInfo(
            builder=self,
            description=f'Images under {config.folder}, {len(config.files)} files.',
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=shape, encoding_format='png'),
                'label': tfds.features.ClassLabel(names=names),
            }),
            supervised_keys=('image', 'label'))

    def _split_generators(self, dl_manager):
        del dl_manager  # The images are local.
        images, labels = self._decode_all()
        train, test = split_rows(labels)
        return {
            'train': self._generate_examples(images, labels, train),
            'test': self._generate_examples(images, labels, test),
        }

    def _generate_examples(self, images, labels, rows):
        yield from labelled_examples(images, labels, rows, shape=images.shape[1:])

    def _decode_all(self) -> tuple[np.ndarray, np.ndarray]:
        config = self.builder_config
        root = pathlib.Path(config.folder)
        images, labels, skipped = [], [], []
        for name in tqdm.tqdm(config.files, desc=f'Preparing {root.name}', unit='image'):
            try:
                images.append(load_image(root / name, image_size=config.image_size,
                                         channels=config.channels))
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                skipped.append(f'{name} ({err})')
                continue
            labels.append(config.class_names.index(name.split('/')[0]) if config.class_names
                          and '/' in name else 0)
        if skipped:
            logging.warning('Skipped %d file(s) that are not readable images: %s', len(skipped),
                            '; '.join(skipped[:10]) + (' ...' if len(skipped) > 10 else ''))
        if not images:
            raise FolderError(f'no readable images in {str(root)!r}: all {len(config.files)} '
                              'image files failed to decode')
        return np.stack(images), np.asarray(labels, np.int64)

"""Image helpers: [-1, 1] floats to uint8, grids, PNG files."""

import math
import os

import numpy as np
from PIL import Image

from diffusion_jax import errors


def to_uint8(x):
    """Model space [-1, 1] to uint8 [0, 255] (inverse of x / 127.5 - 1, rounded, clipped)."""
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images, *, ncol=None, padding=2, pad_value=255):
    """Tiles uint8 images [N, H, W, C] into one [rows*(H+p)+p, ncol*(W+p)+p, C] image."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f'make_grid expects [N, H, W, C], got shape {images.shape}')
    n, h, w, c = images.shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    grid = np.full((nrow * (h + padding) + padding, ncol * (w + padding) + padding, c),
                   pad_value, dtype=images.dtype)
    for i, img in enumerate(images):
        r, col = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = img
    return grid


def save_png(path, image, *, scale=1):
    """Writes a uint8 [H, W, C] (C = 1 or 3) image, optionally upscaled by nearest neighbour."""
    image = np.asarray(image)
    if scale > 1:
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    if image.shape[-1] == 1:
        image = image[..., 0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image).save(path)


def save_gif(path, frames, *, scale=1, duration_ms=80, final_hold_ms=1000):
    """Writes uint8 frames [F, H, W, C] (C = 1 or 3) as a looping GIF, the last frame held."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.dtype != np.uint8 or frames.shape[-1] not in (1, 3):
        raise ValueError(f'save_gif expects uint8 frames [F, H, W, 1 or 3], got {frames.dtype} '
                         f'{frames.shape}')
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    pictures = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in frames]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    durations = [duration_ms] * (len(pictures) - 1) + [final_hold_ms]
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=durations, loop=0)


def load_images(path, *, image_size, channels, padding=2):
    """uint8 images [N, H, W, C] from an .npz (key `images`) or a .png: one image of the
    configured size, or a grid of them as `make_grid` writes it (`padding` pixels around tiles)."""
    if not os.path.isfile(path):
        raise errors.MissingInputError(f'{path}: no such file')
    if path.endswith('.npz'):
        try:
            f = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise errors.InputError(f'{path} is not a readable .npz: {e}') from e
        with f:
            if 'images' not in f:
                raise errors.InputError(
                    f'{path} has no `images` array (it has {sorted(f.keys())})')
            loaded = np.asarray(f['images'])
    elif path.endswith('.png'):
        try:
            picture = Image.open(path).convert('L' if channels == 1 else 'RGB')
        except OSError as e:
            raise errors.InputError(f'{path} is not a readable PNG image: {e}') from e
        loaded = _png_tiles(np.asarray(picture), image_size, padding, path)
    else:
        raise errors.InputError(f'{path}: images must be a .png or an .npz file')
    if loaded.ndim == 3 and channels == 1:
        loaded = loaded[..., None]
    if loaded.ndim != 4 or loaded.shape[1:] != (image_size, image_size, channels):
        raise errors.InputError(f'{path}: expected images of shape [N, {image_size}, {image_size}, '
                                f'{channels}], got {loaded.shape}')
    if loaded.dtype != np.uint8:
        raise errors.InputError(f'{path}: expected uint8 images, got {loaded.dtype}')
    return loaded


def _png_tiles(image, size, padding, path):
    if image.ndim == 2:
        image = image[..., None]
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image[None]
    if (h - padding) % (size + padding) or (w - padding) % (size + padding):
        raise errors.InputError(
            f'{path}: a {h}x{w} image is neither one {size}x{size} image nor a grid '
            f'of them with {padding}-pixel padding')
    rows, cols = (h - padding) // (size + padding), (w - padding) // (size + padding)
    step = size + padding
    return np.stack([image[padding + r * step:padding + r * step + size,
                           padding + c * step:padding + c * step + size]
                     for r in range(rows) for c in range(cols)])

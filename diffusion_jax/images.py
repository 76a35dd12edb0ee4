"""Image helpers: [-1, 1] floats to uint8, grids, PNG files."""

import math
import os

import numpy as np
from PIL import Image


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

"""Image helpers: the GIF writer (denoising trajectories)."""

import numpy as np
import pytest
from PIL import Image, ImageSequence

from diffusion_jax import images


@pytest.mark.parametrize('channels', [1, 3])
def test_gif_round_trips_frames_and_timing(tmp_path, channels):
    rng = np.random.default_rng(0)
    # Few distinct values per frame, so the GIF palette is exact.
    frames = (rng.integers(0, 4, (5, 6, 7, channels)) * 60).astype(np.uint8)
    path = tmp_path / 'sub' / 'chain.gif'
    images.save_gif(path, frames, scale=2, duration_ms=50, final_hold_ms=700)
    with Image.open(path) as gif:
        read = [np.asarray(f.convert('RGB')) for f in ImageSequence.Iterator(gif)]
        durations = [f.info['duration'] for f in ImageSequence.Iterator(gif)]
        assert gif.info['loop'] == 0
    assert len(read) == 5 and read[0].shape == (12, 14, 3)
    expected = np.broadcast_to(frames.repeat(2, 1).repeat(2, 2), (5, 12, 14, 3)) \
        if channels == 1 else frames.repeat(2, 1).repeat(2, 2)
    np.testing.assert_array_equal(np.stack(read), expected)
    assert durations == [50, 50, 50, 50, 700]


def test_gif_rejects_float_frames(tmp_path):
    with pytest.raises(ValueError, match='uint8 frames'):
        images.save_gif(tmp_path / 'x.gif', np.zeros((2, 4, 4, 1), np.float32))

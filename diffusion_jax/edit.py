"""--mode=edit: SDEdit on a trained workdir (`sampling.editing`), with the run's EMA weights.

Guides come from `edit.guide` (.png or .npz) with an optional `edit.mask`; without a guide it
runs the stroke-to-image demo: blocky strokes of the first `edit.num_images` test digits.
Writes edits.npz (guides, masks, the output of every round) and edits.png (rows: guide, then
one row per round).
"""

import logging
import os
import time

import jax
import numpy as np

from diffusion_jax import distributed
from diffusion_jax import errors
from diffusion_jax import images
from diffusion_jax import parallel
from diffusion_jax import sampling
from diffusion_jax import train
from diffusion_jax.evaluate import load_test_split


def load_guides(config):
    """(guide images in [-1, 1], mask or None, the test images the demo strokes came from and
    their labels, or None and None)."""
    e, d = config.edit, config.data
    if e.guide is None:
        test_images, test_labels = load_test_split(config)
        originals, original_labels = test_images[:e.num_images], test_labels[:e.num_images]
        guides = sampling.blocky_strokes(originals / 127.5 - 1.0, block=e.stroke_block)
    else:
        originals = original_labels = None
        guides = images.load_images(e.guide, image_size=d.image_size,
                                    channels=d.channels) / 127.5 - 1.0
    mask = None
    if e.mask is not None:
        mask = images.load_images(e.mask, image_size=d.image_size, channels=d.channels)
        if len(mask) not in (1, len(guides)):
            raise errors.InputError(
                f'edit.mask has {len(mask)} images for {len(guides)} guides: give '
                'one mask for all or one per guide')
        mask = (mask > 0).astype(np.float32)
    return guides.astype(np.float32), mask, originals, original_labels


def edit(config, workdir):
    """Runs SDEdit on the configured guides; returns the outputs [repeats, N, H, W, C] uint8."""
    mesh = parallel.make_mesh()
    process = train.make_diffusion(config.diffusion)
    sampling.check_sampling_config(config.sampling, process)
    # The guides first: a wrong path or shape fails before the checkpoint is read.
    guides, mask, originals, original_labels = load_guides(config)
    model, params, step = train.restore_ema_params(config, workdir, mesh)
    sampler = train.make_sampler(config, model, process, mesh)
    labels = np.full((len(guides),), -1, np.int32)
    if sampler.num_classes and original_labels is not None:
        labels = np.asarray(original_labels, np.int32)  # The stroke demo: the digit drawn.
    elif sampler.num_classes:
        labels = sampling.sample_labels(config.sampling.labels, len(guides), sampler.num_classes,
                                        jax.random.key(config.seed))
    logging.info('SDEdit of %d guides at t0=%g, %d round(s), EMA weights of step %d',
                 len(guides), config.edit.t0, config.edit.repeats, step)
    if len(guides) % mesh.devices.size == 0:  # The samplers' jit follows the guides' sharding.
        guides = jax.device_put(guides, parallel.data_sharded(mesh))
    start = time.perf_counter()
    outputs = sampling.sdedit(
        sampler.model_apply, train.sampler_params(config, sampler, params, labels), process,
        guides, jax.random.fold_in(jax.random.key(config.seed), 0xED17), t0=config.edit.t0,
        mask=mask, repeats=config.edit.repeats, sampling_config=config.sampling,
        guidance_fn=sampler.guidance_fn, progress=True)
    outputs = images.to_uint8(distributed.to_host(outputs))
    logging.info('Edited in %.1f s', time.perf_counter() - start)
    if jax.process_index() == 0:
        guides_uint8 = images.to_uint8(distributed.to_host(guides))
        np.savez_compressed(os.path.join(workdir, 'edits.npz'), guides=guides_uint8,
                            edits=outputs, labels=labels,
                            **({} if mask is None else {'masks': mask.astype(np.uint8)}),
                            **({} if originals is None else {'originals': originals}))
        rows = [guides_uint8] + list(outputs)
        if originals is not None:
            rows = [originals] + rows
        grid = np.stack(rows).reshape((-1,) + guides_uint8.shape[1:])
        images.save_png(os.path.join(workdir, 'edits.png'),
                        images.make_grid(grid, ncol=len(guides)),
                        scale=max(1, 64 // config.data.image_size))
    return outputs

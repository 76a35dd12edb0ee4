"""Converts pytorch-fid's FID Inception weights (`pt_inception-2015-12-05-6726825d.pth`) into
the pickle-free `.npz` read by `diffusion_jax.evaluation.inception.load_params`.

Needs PyTorch (only for this one-off conversion; the .pth is a torch pickle):

    python scripts/convert_inception_weights.py pt_inception-2015-12-05-6726825d.pth \
        inception_fid.npz

The .npz holds one float32 array per state-dict entry, keyed by the PyTorch name
(`Conv2d_1a_3x3.conv.weight`, ..., `fc.bias`); `num_batches_tracked` counters are dropped.
The result is validated by loading it back with `load_params`.
"""

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from diffusion_jax.evaluation import inception  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('pth', help='pt_inception-2015-12-05-6726825d.pth')
    parser.add_argument('out', help='output .npz')
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        sys.exit('PyTorch is needed to read the .pth (pip install torch, CPU build is enough).')

    try:
        state_dict = torch.load(args.pth, map_location='cpu', weights_only=True)
    except TypeError:  # torch < 1.13 has no weights_only
        state_dict = torch.load(args.pth, map_location='cpu')
    if 'state_dict' in state_dict and not hasattr(state_dict['state_dict'], 'shape'):
        state_dict = state_dict['state_dict']
    arrays = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in state_dict.items()
              if not k.endswith('num_batches_tracked')}
    inception.state_dict_to_params(arrays, source=args.pth)  # validates names and shapes
    out = args.out if args.out.endswith('.npz') else args.out + '.npz'
    np.savez(out, **arrays)
    inception.load_params(out)
    print(f'wrote {len(arrays)} arrays to {out}')


if __name__ == '__main__':
    main()

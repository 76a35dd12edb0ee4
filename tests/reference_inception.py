"""A float64 NumPy forward of the FID Inception, written from the network's description.

The description: torchvision's Inception3 (Szegedy et al. 2016) as pytorch-fid rebuilds it for
FID (`fid_inception_v3`): 1008 classes; in Mixed_5b-d, 6b-e and 7b the average pools do not
count the zero padding (TensorFlow's pooling), and the pool branch of Mixed_7c takes a 3x3
stride-1 *max* pool. Each BasicConv2d is conv (no bias) -> batch norm (eps 1e-3, running
statistics) -> ReLU. Inputs are resized bilinearly to 299x299 (half-pixel centres, no
antialiasing) and scaled to [-1, 1]. Weights are a PyTorch-layout state dict (OIHW kernels).

No JAX, no Flax, and none of `diffusion_jax.evaluation.inception`: an independent reference.
"""

import numpy as np

BN_EPS = 1e-3


def bilinear_matrix(n_in, n_out):
    """[n_out, n_in] interpolation of PyTorch's bilinear resize with align_corners=False."""
    m = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for i in range(n_out):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        m[i, i0] += 1 - (src - i0)
        m[i, i1] += src - i0
    return m


def resize_bilinear(images, size):
    """NHWC images resized to size x size in float64, PyTorch's bilinear (align_corners=False)."""
    return np.einsum('ah,nhwc,bw->nabc', bilinear_matrix(images.shape[1], size),
                     images.astype(np.float64), bilinear_matrix(images.shape[2], size))


def conv(x, w, stride=1, padding=(0, 0)):
    """NHWC x, OIHW w -> NHWC, zero padding (ph, pw), as a sum over kernel offsets."""
    ph, pw = padding
    x = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    kh, kw = w.shape[2:]
    h_out = (x.shape[1] - kh) // stride + 1
    w_out = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], h_out, w_out, w.shape[0]))
    for dy in range(kh):
        for dx in range(kw):
            patch = x[:, dy:dy + stride * (h_out - 1) + 1:stride,
                      dx:dx + stride * (w_out - 1) + 1:stride]
            out += patch @ w[:, :, dy, dx].T
    return out


def pool(x, size, stride, padding, kind):
    """Max or average pooling; the average counts only the real (unpadded) inputs."""
    fill = -np.inf if kind == 'max' else 0.0
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                constant_values=fill)
    ones = np.pad(np.ones(x.shape[1:3]), padding)
    h_out = (xp.shape[1] - size) // stride + 1
    w_out = (xp.shape[2] - size) // stride + 1
    windows = [xp[:, dy:dy + stride * (h_out - 1) + 1:stride,
                  dx:dx + stride * (w_out - 1) + 1:stride]
               for dy in range(size) for dx in range(size)]
    if kind == 'max':
        return np.max(windows, axis=0)
    counts = sum(ones[dy:dy + stride * (h_out - 1) + 1:stride,
                      dx:dx + stride * (w_out - 1) + 1:stride]
                 for dy in range(size) for dx in range(size))
    return np.sum(windows, axis=0) / counts[None, :, :, None]


class Reference:
    """The forward pass over a state dict `sd` (name -> array)."""

    def __init__(self, sd):
        self.sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}

    def basic(self, name, x, stride=1, padding=(0, 0)):
        w = self.sd[f'{name}.conv.weight']
        y = conv(x, w, stride, padding)
        mean, var = self.sd[f'{name}.bn.running_mean'], self.sd[f'{name}.bn.running_var']
        y = (y - mean) / np.sqrt(var + BN_EPS) * self.sd[f'{name}.bn.weight'] + \
            self.sd[f'{name}.bn.bias']
        return np.maximum(y, 0.0)

    def block_a(self, name, x):
        b = lambda sub, y, **k: self.basic(f'{name}.{sub}', y, **k)
        branch5 = b('branch5x5_2', b('branch5x5_1', x), padding=(2, 2))
        dbl = b('branch3x3dbl_1', x)
        dbl = b('branch3x3dbl_3', b('branch3x3dbl_2', dbl, padding=(1, 1)), padding=(1, 1))
        pooled = b('branch_pool', pool(x, 3, 1, 1, 'avg'))
        return np.concatenate([b('branch1x1', x), branch5, dbl, pooled], axis=-1)

    def block_b(self, name, x):
        b = lambda sub, y, **k: self.basic(f'{name}.{sub}', y, **k)
        dbl = b('branch3x3dbl_2', b('branch3x3dbl_1', x), padding=(1, 1))
        return np.concatenate([b('branch3x3', x, stride=2), b('branch3x3dbl_3', dbl, stride=2),
                               pool(x, 3, 2, 0, 'max')], axis=-1)

    def block_c(self, name, x):
        b = lambda sub, y, **k: self.basic(f'{name}.{sub}', y, **k)
        row, col = (0, 3), (3, 0)  # 1x7 and 7x1 paddings.
        b7 = b('branch7x7_3', b('branch7x7_2', b('branch7x7_1', x), padding=row), padding=col)
        d = b('branch7x7dbl_1', x)
        for i, pad in ((2, col), (3, row), (4, col), (5, row)):
            d = b(f'branch7x7dbl_{i}', d, padding=pad)
        pooled = b('branch_pool', pool(x, 3, 1, 1, 'avg'))
        return np.concatenate([b('branch1x1', x), b7, d, pooled], axis=-1)

    def block_d(self, name, x):
        b = lambda sub, y, **k: self.basic(f'{name}.{sub}', y, **k)
        b3 = b('branch3x3_2', b('branch3x3_1', x), stride=2)
        b7 = b('branch7x7x3_3', b('branch7x7x3_2', b('branch7x7x3_1', x), padding=(0, 3)),
               padding=(3, 0))
        b7 = b('branch7x7x3_4', b7, stride=2)
        return np.concatenate([b3, b7, pool(x, 3, 2, 0, 'max')], axis=-1)

    def block_e(self, name, x, pool_kind):
        b = lambda sub, y, **k: self.basic(f'{name}.{sub}', y, **k)
        b3 = b('branch3x3_1', x)
        b3 = np.concatenate([b('branch3x3_2a', b3, padding=(0, 1)),
                             b('branch3x3_2b', b3, padding=(1, 0))], axis=-1)
        d = b('branch3x3dbl_2', b('branch3x3dbl_1', x), padding=(1, 1))
        d = np.concatenate([b('branch3x3dbl_3a', d, padding=(0, 1)),
                            b('branch3x3dbl_3b', d, padding=(1, 0))], axis=-1)
        pooled = b('branch_pool', pool(x, 3, 1, 1, pool_kind))
        return np.concatenate([b('branch1x1', x), b3, d, pooled], axis=-1)

    def __call__(self, images):
        """uint8 NHWC images -> dict(pool3 [N, 2048], logits [N, 1008]) in float64."""
        x = resize_bilinear(images, 299) * (2 / 255) - 1
        x = self.basic('Conv2d_1a_3x3', x, stride=2)
        x = self.basic('Conv2d_2a_3x3', x)
        x = self.basic('Conv2d_2b_3x3', x, padding=(1, 1))
        x = pool(x, 3, 2, 0, 'max')
        x = self.basic('Conv2d_3b_1x1', x)
        x = self.basic('Conv2d_4a_3x3', x)
        x = pool(x, 3, 2, 0, 'max')
        for name in ('Mixed_5b', 'Mixed_5c', 'Mixed_5d'):
            x = self.block_a(name, x)
        x = self.block_b('Mixed_6a', x)
        for name in ('Mixed_6b', 'Mixed_6c', 'Mixed_6d', 'Mixed_6e'):
            x = self.block_c(name, x)
        x = self.block_d('Mixed_7a', x)
        x = self.block_e('Mixed_7b', x, 'avg')
        x = self.block_e('Mixed_7c', x, 'max')
        pool3 = x.mean(axis=(1, 2))
        return dict(pool3=pool3, logits=pool3 @ self.sd['fc.weight'].T + self.sd['fc.bias'])

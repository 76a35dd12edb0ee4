"""3x3 convolutions computed or differentiated as matmuls where that is faster on the CPU.

Why, float32: on the CPU, XLA's own gradient of a stride-1 3x3 'SAME' convolution ran at about a
quarter of the forward's FLOP rate on the 2-core AVX2 machines (37 vs 130-145 GFLOP/s at
32x32x128; docs/benchmarks.md), and these layers are most of a training step. The same gradient as

  dx = conv(g, W flipped in both spatial axes, in/out channels swapped)     (a forward conv)
  dW[i, j] = (g^T x_pad[:, i:i+H, j:j+W])^T  for the nine kernel offsets     ([Cout, BHW] matmuls)

runs at 1.3-3.7x XLA's rate for the weight gradient of 64-256-channel layers there
(docs/benchmarks.md). With fewer channels the nine small matmuls lose to XLA (the MNIST main
job's 16-32-channel U-Net trained 24% slower with them), so 'auto' uses them only on the CPU and
only for layers with at least AUTO_MIN_CHANNELS input and output channels; on TPU and GPU XLA's
own gradient is the fast one.

Why, bfloat16: XLA's CPU convolution computes bfloat16 at float32 speed, but its bfloat16 matmul
with float32 accumulation runs on the CPU's bfloat16 units (AVX512-BF16, AMX-BF16) at about twice
the float32 rate (389 vs 199 GFLOP/s, 2048^3, AMD EPYC with AVX512-BF16). So on such CPUs 'auto'
computes a bfloat16 3x3 convolution, forward and backward, as matmuls (`_bf16_conv3x3`): the
three column taps of each padded row side by side ([B, H+2, W, 3C]), then one [3C, Cout] matmul
per kernel row, accumulated in float32; a few images at a time, so that each matmul's operands
stay in the caches. Without bfloat16 units those matmuls would be emulated, and 'auto' keeps
XLA's convolution; so it does for layers under AUTO_MIN_CHANNELS channels, as in float32.

Every path is the same function up to float rounding (tested against a float64 NumPy reference
and against `jax.grad` of XLA's convolution in tests/test_unet.py).
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
from jax import lax

CONV_BACKWARDS = ('auto', 'xla', 'matmul', 'bf16_matmul')
AUTO_MIN_CHANNELS = 64
_NHWC = ('NHWC', 'HWIO', 'NHWC')
# Pixels per matmul of the bfloat16 path: 4 images at 32x32. Measured 2026-12-06 (AMD EPYC,
# AVX512-BF16), 16x32x32x128 forward: 161 GFLOP/s as one matmul per kernel row over the batch,
# 298 four images at a time; XLA's convolution 186.
BF16_CHUNK_PIXELS = 4096


def _conv(x, w, precision):
    return lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=_NHWC,
                                    precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv3x3(x, w, precision):
    return _conv(x, w, precision)


def _conv3x3_forward(x, w, precision):
    return _conv(x, w, precision), (x, w)


def _conv3x3_backward(precision, residuals, g):
    x, w = residuals
    # Stride 1 with symmetric padding: the transpose is the correlation with the flipped kernel.
    dx = _conv(g, jnp.flip(w, (0, 1)).swapaxes(2, 3), precision)
    _, height, width, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # g^T x (not x^T g): the [Cout, Cin] product contracts over the minor-most batch-pixel axis
    # the way XLA's CPU dot is fastest; nine matmuls beat one im2col matmul and need no 9x buffer.
    dw = jnp.stack([jnp.einsum('bhwo,bhwc->oc', g, padded[:, i:i + height, j:j + width],
                               precision=precision)
                    for i in range(3) for j in range(3)])
    return dx, dw.swapaxes(1, 2).reshape(w.shape)


_conv3x3.defvjp(_conv3x3_forward, _conv3x3_backward)


@functools.cache
def cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = re.search(r'flags\s*:\s*(.*)', f.read())
    except OSError:
        return frozenset()
    return frozenset(flags.group(1).split()) if flags else frozenset()


def cpu_has_bf16_matmul():
    """Whether this machine's CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16)."""
    return bool(cpu_flags() & {'avx512_bf16', 'amx_bf16'})


def _row_taps(x):
    """[B, H, W, C] -> [B, H + 2, W, 3C]: each 'SAME'-padded row with its three column taps
    (kernel columns j = 0, 1, 2) side by side, the layout of w[i].reshape(3C, Cout)."""
    width = x.shape[2]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.concatenate([padded[:, :, j:j + width] for j in range(3)], axis=-1)


def _bf16_chunks(x):
    """x split into [num_chunks, images per chunk, H, W, C] (about BF16_CHUNK_PIXELS each),
    chunk c holding images c, c + num_chunks, ...: interleaved, so that when the batch is split
    over devices in contiguous blocks (data parallelism under jit), every chunk is split the
    same way and the loop over chunks moves no data between devices."""
    batch, height, width = x.shape[:3]
    size = math.gcd(batch, max(1, BF16_CHUNK_PIXELS // (height * width)))
    return x.reshape(size, batch // size, *x.shape[1:]).swapaxes(0, 1)


def _unchunk(y):
    """The inverse of `_bf16_chunks`: [num_chunks, size, ...] -> [batch, ...]."""
    return y.swapaxes(0, 1).reshape(-1, *y.shape[2:])


def _bf16_forward(x, w):
    """y[b, h, w] = sum_ij x_pad[b, h + i, w + j] @ w[i, j]: a matmul of the row taps per
    kernel row i, float32 accumulation, chunk by chunk of images; returns x.dtype."""
    height, cin, cout = x.shape[1], w.shape[2], w.shape[3]

    def chunk(xc):
        taps = _row_taps(xc)
        y = sum(jnp.einsum('bhwk,ko->bhwo', taps[:, i:i + height], w[i].reshape(3 * cin, cout),
                           preferred_element_type=jnp.float32) for i in range(3))
        return y.astype(x.dtype)  # Rounded per chunk: no float32 copy of the whole output.
    return _unchunk(lax.map(chunk, _bf16_chunks(x)))


@jax.custom_vjp
def _bf16_conv3x3(x, w):
    return _bf16_forward(x, w)


def _bf16_conv3x3_forward(x, w):
    return _bf16_forward(x, w), (x, w)


def _bf16_conv3x3_backward(residuals, g):
    x, w = residuals
    height, cin, cout = x.shape[1], w.shape[2], w.shape[3]
    # dx: the correlation of g with the flipped, transposed kernel (stride 1, symmetric padding).
    dx = _bf16_forward(g, jnp.flip(w, (0, 1)).swapaxes(2, 3))

    def add_chunk(dw, chunk):
        xc, gc = chunk
        taps = _row_taps(xc)
        # g^T taps ([Cout, 3C]) rather than taps^T g: measured 231 vs 153 GFLOP/s at
        # 16x32x32x128 (the same contraction order as the float32 path's nine matmuls).
        return dw + jnp.stack([jnp.einsum('bhwo,bhwk->ok', gc, taps[:, i:i + height],
                                          preferred_element_type=jnp.float32)
                               for i in range(3)]), None
    dw, _ = lax.scan(add_chunk, jnp.zeros((3, cout, 3 * cin), jnp.float32),
                     (_bf16_chunks(x), _bf16_chunks(g)))
    return dx, dw.swapaxes(1, 2).reshape(w.shape).astype(w.dtype)


_bf16_conv3x3.defvjp(_bf16_conv3x3_forward, _bf16_conv3x3_backward)


def _is_plain_3x3(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                  dimension_numbers, feature_group_count, batch_group_count,
                  preferred_element_type):
    """A stride-1, undilated, ungrouped 3x3 'SAME' convolution in NHWC/HWIO."""
    return (rhs.shape[:2] == (3, 3) and tuple(window_strides) == (1, 1)
            and padding in ('SAME', ((1, 1), (1, 1))) and lhs.ndim == 4
            and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
            and feature_group_count == 1 and batch_group_count == 1
            and preferred_element_type is None
            and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))


def bf16_matmul_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                     rhs_dilation=None, dimension_numbers=None,
                                     feature_group_count=1, batch_group_count=1,
                                     precision=None, preferred_element_type=None):
    """Drop-in for `lax.conv_general_dilated`: plain 3x3 convolutions of bfloat16 operands as
    bfloat16 matmuls with float32 accumulation, forward and backward (`_bf16_conv3x3`); any
    other convolution goes to `matmul_grad_conv_general_dilated`."""
    args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, preferred_element_type)
    if lhs.dtype == rhs.dtype == jnp.bfloat16 and _is_plain_3x3(*args):
        return _bf16_conv3x3(lhs, rhs)
    return matmul_grad_conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)


def matmul_grad_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                     rhs_dilation=None, dimension_numbers=None,
                                     feature_group_count=1, batch_group_count=1, precision=None,
                                     preferred_element_type=None):
    """Drop-in for `lax.conv_general_dilated` (as `nn.Conv(conv_general_dilated=...)`).

    Stride-1, undilated, ungrouped 3x3 'SAME' convolutions in NHWC/HWIO get the custom gradient;
    anything else goes to XLA unchanged.
    """
    if not _is_plain_3x3(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                         dimension_numbers, feature_group_count, batch_group_count,
                         preferred_element_type):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type)
    return _conv3x3(lhs, rhs, precision)


def auto_cpu_conv_general_dilated(lhs, rhs, *args, **kwargs):
    """'auto' on the CPU: kernels (HWIO) with fewer than AUTO_MIN_CHANNELS input or output
    channels keep XLA's convolution (in bfloat16 too: the MNIST U-Net's 16-64-channel step ran
    at 112 images/s with the bfloat16 matmuls, 199 with XLA's, 2026-12-06). Wider ones get
    `bf16_matmul_conv_general_dilated` for bfloat16 operands on a CPU with bfloat16 matmul
    units, else the matmul gradient."""
    if min(rhs.shape[-2:]) < AUTO_MIN_CHANNELS:
        return lax.conv_general_dilated(lhs, rhs, *args, **kwargs)
    if lhs.dtype == rhs.dtype == jnp.bfloat16 and cpu_has_bf16_matmul():
        return bf16_matmul_conv_general_dilated(lhs, rhs, *args, **kwargs)
    return matmul_grad_conv_general_dilated(lhs, rhs, *args, **kwargs)


def auto_conv_general_dilated(lhs, rhs, *args, **kwargs):
    """'auto': `auto_cpu_conv_general_dilated` in a program compiled for the CPU, XLA's own
    convolution in one compiled for a TPU or GPU.

    The choice follows the platform the program is lowered for (`lax.platform_dependent`), not
    the process's default backend: a TPU program compiled ahead of time on a CPU host
    (`diffusion_jax.aot`) gets the TPU's kernels, and only the chosen branch is lowered.
    """
    def xla(lhs, rhs):
        return lax.conv_general_dilated(lhs, rhs, *args, **kwargs)

    def cpu(lhs, rhs):
        return auto_cpu_conv_general_dilated(lhs, rhs, *args, **kwargs)

    return lax.platform_dependent(lhs, rhs, cpu=cpu, default=xla)


def conv_general_dilated(conv_backward):
    """The convolution function of a `UNet.conv_backward` setting.

    'auto' is `auto_conv_general_dilated` (the CPU paths only in CPU programs); 'bf16_matmul'
    forces the bfloat16 matmul convolution (for bfloat16 operands; float32 ones get 'matmul')
    whatever the CPU.
    """
    if conv_backward not in CONV_BACKWARDS:
        raise ValueError(f'Unknown conv_backward {conv_backward!r}; valid: '
                         f'{", ".join(CONV_BACKWARDS)}')
    if conv_backward == 'auto':
        return auto_conv_general_dilated
    return {'matmul': matmul_grad_conv_general_dilated,
            'bf16_matmul': bf16_matmul_conv_general_dilated,
            'xla': lax.conv_general_dilated}[conv_backward]

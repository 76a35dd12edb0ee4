"""A 3x3 convolution whose backward pass is written as one plain convolution and nine matmuls.

Why: on the CPU, XLA's own gradient of a stride-1 3x3 'SAME' convolution runs at about a quarter
of the forward's FLOP rate (37 vs 130-145 GFLOP/s at 32x32x128 on the 2-core AVX2 machines; see
docs/benchmarks.md), and these layers are most of a training step. The same gradient as

  dx = conv(g, W flipped in both spatial axes, in/out channels swapped)     (a forward conv)
  dW[i, j] = (g^T x_pad[:, i:i+H, j:j+W])^T  for the nine kernel offsets     ([Cout, BHW] matmuls)

runs at 1.3-3.7x XLA's rate for the weight gradient of 64-256-channel layers (docs/benchmarks.md).
With fewer channels the nine small matmuls lose to XLA (the MNIST main job's 16-32-channel U-Net
trained 24% slower with them), so 'auto' uses them only on the CPU and only for layers with at
least AUTO_MIN_CHANNELS input and output channels; on TPU and GPU XLA's own gradient is the fast
one. The result is the same function up to float rounding (tested against a float64 NumPy
reference and against `jax.grad` of XLA's convolution in tests/test_unet.py).
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

CONV_BACKWARDS = ('auto', 'xla', 'matmul')
AUTO_MIN_CHANNELS = 64
_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _conv(x, w, precision):
    return lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=_NHWC,
                                    precision=precision)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
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


def matmul_grad_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                     rhs_dilation=None, dimension_numbers=None,
                                     feature_group_count=1, batch_group_count=1, precision=None,
                                     preferred_element_type=None):
    """Drop-in for `lax.conv_general_dilated` (as `nn.Conv(conv_general_dilated=...)`).

    Stride-1, undilated, ungrouped 3x3 'SAME' convolutions in NHWC/HWIO get the custom gradient;
    anything else goes to XLA unchanged.
    """
    plain = (rhs.shape[:2] == (3, 3) and tuple(window_strides) == (1, 1)
             and padding in ('SAME', ((1, 1), (1, 1))) and lhs.ndim == 4
             and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
             and feature_group_count == 1 and batch_group_count == 1
             and preferred_element_type is None
             and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
             == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
    if not plain:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type)
    return _conv3x3(lhs, rhs, precision)


def auto_cpu_conv_general_dilated(lhs, rhs, *args, **kwargs):
    """'auto' on the CPU: the matmul gradient for kernels (HWIO) with at least
    AUTO_MIN_CHANNELS input and output channels, XLA's for smaller ones."""
    if min(rhs.shape[-2:]) >= AUTO_MIN_CHANNELS:
        return matmul_grad_conv_general_dilated(lhs, rhs, *args, **kwargs)
    return lax.conv_general_dilated(lhs, rhs, *args, **kwargs)


def conv_general_dilated(conv_backward):
    """The convolution function of a `UNet.conv_backward` setting.

    'auto' is `auto_cpu_conv_general_dilated` when the default backend is the CPU and XLA's
    convolution elsewhere.
    """
    if conv_backward not in CONV_BACKWARDS:
        raise ValueError(f'Unknown conv_backward {conv_backward!r}; valid: '
                         f'{", ".join(CONV_BACKWARDS)}')
    if conv_backward == 'auto':
        return (auto_cpu_conv_general_dilated if jax.default_backend() == 'cpu'
                else lax.conv_general_dilated)
    return (matmul_grad_conv_general_dilated if conv_backward == 'matmul' else
            lax.conv_general_dilated)

"""Building blocks of the DDPM U-Net (Ho et al. 2020, Appendix B).

A port of diffusion_tf/nn.py and the blocks of diffusion_tf/models/unet.py. Submodule names follow
the original TF variable scopes so that released checkpoints map onto them one to one.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import conv

# tf.contrib.layers.group_norm's default epsilon, which the original relies on.
GROUP_NORM_EPSILON = 1e-6


def dtypes(module: nn.Module) -> dict[str, Any]:
    """The compute and parameter dtypes of `module`, as keyword arguments for its layers."""
    return {'dtype': module.dtype, 'param_dtype': module.param_dtype}


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
    """The original's weight initialiser: variance scaling, fan_avg, uniform.

    Args:
      scale: variance scale. The original passes 0 for layers that should start as the identity
        of the residual path and replaces it by 1e-10; we do the same to match it exactly.

    Returns:
      A Flax initializer.
    """
    return nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, 'fan_avg', 'uniform')


def conv3x3(features: int, *, name: str, dtype: Any, scale: float = 1.0, stride: int = 1,
            conv_backward: str = 'xla', param_dtype: Any = jnp.float32) -> nn.Conv:
    """3x3 convolution with TF 'SAME' padding (for stride 2 on even sizes: pad (0, 1)).

    `conv_backward` picks how stride-1 convolutions are differentiated (see models/conv.py).
    """
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding='SAME',
                   kernel_init=default_init(scale), bias_init=nn.initializers.zeros,
                   dtype=dtype, param_dtype=param_dtype, name=name,
                   conv_general_dilated=conv.conv_general_dilated(conv_backward))


def nin(features: int, *, name: str, dtype: Any, scale: float = 1.0,
        param_dtype: Any = jnp.float32) -> nn.Dense:
    """Network-in-network (1x1 conv) layer: a Dense on the channel axis, as in the original."""
    return nn.Dense(features, kernel_init=default_init(scale), bias_init=nn.initializers.zeros,
                    dtype=dtype, param_dtype=param_dtype, name=name)


class GroupNorm(nn.Module):
    """GroupNorm (Wu & He 2018) over the last axis, statistics in at least float32.

    Same parameters ('scale', 'bias' of shape [C]) and result as `flax.linen.GroupNorm` with the
    same epsilon, but the statistics are sums per channel over the pixels first, then per group:
    XLA's CPU reductions over the [..., G, C/G] view with its short minor axis took ~20% of the
    MNIST sampler's time.

    Attributes:
      num_groups: groups G; must divide the channel count C.
      epsilon: added to the variance.
      dtype: compute dtype; the statistics and the output are in promote(dtype, float32)
        (float64 stays float64, as the finite-difference tests need).
      param_dtype: dtype of scale and bias.
    """
    num_groups: int
    epsilon: float = GROUP_NORM_EPSILON
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f'GroupNorm: {self.num_groups} groups do not divide {channels} '
                             'channels')
        scale = self.param('scale', nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param('bias', nn.initializers.zeros, (channels,), self.param_dtype)
        dtype = jnp.promote_types(self.dtype, jnp.float32)
        x = x.astype(dtype)
        pixel_axes = tuple(range(1, x.ndim - 1))
        group_size = channels // self.num_groups
        count = group_size * math.prod(x.shape[1:-1])

        def group_mean(per_channel_sum):  # [B, C] -> [B, C], each channel its group's mean.
            sums = per_channel_sum.reshape(-1, self.num_groups, group_size).sum(-1) / count
            return jnp.repeat(sums, group_size, axis=-1)

        mean = group_mean(jnp.sum(x, pixel_axes))
        # E[x^2] - E[x]^2, as flax's default fast variance; clamped against rounding below 0.
        variance = jnp.maximum(group_mean(jnp.sum(jnp.square(x), pixel_axes)) - mean ** 2, 0.0)
        gain = jax.lax.rsqrt(variance + self.epsilon) * scale.astype(dtype)
        shift = bias.astype(dtype) - mean * gain
        broadcast = (x.shape[0],) + (1,) * len(pixel_axes) + (channels,)
        return x * gain.reshape(broadcast) + shift.reshape(broadcast)


def group_norm(num_groups: int, *, name: str, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32) -> GroupNorm:
    """The U-Net's GroupNorm (the original's epsilon), statistics in at least float32."""
    return GroupNorm(num_groups=num_groups, dtype=dtype, param_dtype=param_dtype, name=name)


def get_timestep_embedding(t: jax.Array, embedding_dim: int) -> jax.Array:
    """Sinusoidal timestep embedding (Ho et al. 2020, Sec. 4; Vaswani et al. 2017).

    Frequencies are exp(-ln(10000) * i / (half - 1)) for i < half = embedding_dim // 2; sin comes
    first, then cos, as in the original (diffusers: flip_sin_to_cos=False, freq_shift=1).

    Args:
      t: timesteps, shape [B], int or float.
      embedding_dim: output dimension; an odd dimension gets a zero column at the end.

    Returns:
      float32 array of shape [B, embedding_dim].
    """
    if t.ndim != 1:
        raise ValueError(f't must have shape [B], got shape {t.shape}')
    half = embedding_dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000) / (half - 1)))
    emb = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class ResnetBlock(nn.Module):
    """Wide-ResNet block with the timestep embedding added after the first conv.

    Attributes:
      out_ch: output channels; a 1x1 'nin_shortcut' projects x when the channel count changes.
      dropout: dropout rate before the second conv.
      num_groups: GroupNorm groups.
      dtype: compute dtype.
      conv_backward: gradient of the 3x3 convolutions (models/conv.py).
      param_dtype: parameter storage dtype.
    """
    out_ch: int
    dropout: float
    num_groups: int = 32
    dtype: Any = jnp.float32
    conv_backward: str = 'xla'
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
        """Applies the block.

        Args:
          x: [B, H, W, C] features.
          temb: [B, D] timestep embedding (after the two temb Dense layers).
          train: enables dropout (needs the 'dropout' rng).

        Returns:
          [B, H, W, out_ch] features.
        """
        h = nn.swish(group_norm(self.num_groups, name='norm1', **dtypes(self))(x))
        h = conv3x3(self.out_ch, name='conv1', **dtypes(self),
                    conv_backward=self.conv_backward)(h)
        h = h + nin(self.out_ch, name='temb_proj', **dtypes(self))(nn.swish(temb))[:, None, None]
        h = nn.swish(group_norm(self.num_groups, name='norm2', **dtypes(self))(h))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        # Near-zero init (init_scale=0 in the original): each block starts as its shortcut path.
        h = conv3x3(self.out_ch, name='conv2', **dtypes(self), scale=0.0,
                    conv_backward=self.conv_backward)(h)
        if x.shape[-1] != self.out_ch:
            x = nin(self.out_ch, name='nin_shortcut', **dtypes(self))(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual connection.

    Attributes:
      num_groups: GroupNorm groups.
      dtype: compute dtype (the softmax is in at least float32).
      param_dtype: parameter storage dtype.
    """
    num_groups: int = 32
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block.

        Args:
          x: [B, H, W, C] features.

        Returns:
          [B, H, W, C] features.
        """
        B, H, W, C = x.shape
        h = group_norm(self.num_groups, name='norm', **dtypes(self))(x)
        q, k, v = (nin(C, name=n, **dtypes(self))(h).reshape(B, H * W, C) for n in 'qkv')
        logits_dtype = jnp.promote_types(self.dtype, jnp.float32)
        w = jnp.einsum('bqc,bkc->bqk', q, k, preferred_element_type=logits_dtype) * (C ** -0.5)
        w = jax.nn.softmax(w, axis=-1).astype(v.dtype)
        h = jnp.einsum('bqk,bkc->bqc', w, v).reshape(B, H, W, C)
        h = nin(C, name='proj_out', **dtypes(self), scale=0.0)(h)
        return x + h


class Downsample(nn.Module):
    """Halves the spatial size: 3x3 stride-2 conv, or 2x2 average pooling.

    Attributes:
      with_conv: use the strided conv (resamp_with_conv in the original).
      dtype: compute dtype.
      param_dtype: parameter storage dtype.
    """
    with_conv: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the downsampling.

        Args:
          x: [B, H, W, C] features.

        Returns:
          [B, ceil(H / 2), ceil(W / 2), C] features.
        """
        if self.with_conv:
            return conv3x3(x.shape[-1], name='conv', **dtypes(self), stride=2)(x)
        # TF's 'SAME' avg_pool leaves padding out of the average.
        return nn.avg_pool(x, (2, 2), strides=(2, 2), padding='SAME', count_include_pad=False)


class Upsample(nn.Module):
    """Doubles the spatial size: nearest neighbour, then an optional 3x3 conv.

    Attributes:
      with_conv: follow the resize by a conv (resamp_with_conv in the original).
      dtype: compute dtype.
      conv_backward: gradient of the 3x3 convolution (models/conv.py).
      param_dtype: parameter storage dtype.
    """
    with_conv: bool = True
    dtype: Any = jnp.float32
    conv_backward: str = 'xla'
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the upsampling.

        Args:
          x: [B, H, W, C] features.

        Returns:
          [B, 2H, 2W, C] features.
        """
        # At an exact 2x factor TF's align_corners nearest resize is plain pixel repetition.
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if self.with_conv:
            x = conv3x3(x.shape[-1], name='conv', **dtypes(self),
                        conv_backward=self.conv_backward)(x)
        return x

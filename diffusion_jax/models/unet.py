"""The DDPM U-Net (Ho et al. 2020, Appendix B), ported from diffusion_tf/models/unet.py.

A PixelCNN++-style wide-ResNet U-Net with a sinusoidal timestep embedding, self-attention at the
resolutions in `attn_resolutions`, strided-conv downsampling and nearest+conv upsampling. With the
CIFAR-10 settings (the defaults) it has 35,746,307 parameters, the paper's 35.7M.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers


class EncoderFields(nn.Module):
    """The fields of the U-Net's encoder (`encode`), shared with the noise-aware classifier.

    Attributes:
      ch: base channel count; also the timestep embedding dimension (the MLP widens it to 4ch).
      ch_mult: channel multiplier per resolution level; one downsample between levels.
      num_res_blocks: ResnetBlocks per level on the way down (one more on the way up).
      attn_resolutions: spatial sizes after whose ResnetBlocks an AttnBlock is inserted.
      dropout: dropout rate inside the ResnetBlocks (active only when train=True).
      resamp_with_conv: convolutions in Downsample/Upsample (else avg-pool / plain resize).
      num_groups: GroupNorm groups.
      dtype: compute dtype of the convolutions, dense layers and attention products (the
        mixed-precision policy: with bfloat16 the GroupNorms, softmax, output and loss stay
        float32).
      param_dtype: parameter storage dtype (float32 under the mixed-precision policy).
      conv_backward: how the 3x3 convolutions are differentiated (and, in bfloat16, computed):
        'xla', 'matmul' (faster on the CPU for wide layers, same gradient; models/conv.py),
        'bf16_matmul' (bfloat16 convolutions as bfloat16 matmuls, forward and backward) or
        'auto' (on the CPU: bf16_matmul for bfloat16 where the CPU has bfloat16 units, else
        matmul for layers of >= 64 channels, else xla; elsewhere xla).
    """
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    num_groups: int = 32
    dtype: Any = jnp.float32
    conv_backward: str = 'xla'
    param_dtype: Any = jnp.float32


class UNet(EncoderFields):
    """eps_theta(x_t, t): predicts the noise, or what `Diffusion.output_groups` asks for (2C
    channels with a learned variance, 3C for dual output); float32 whatever the compute dtype.

    Attributes (besides `EncoderFields`):
      out_ch: output channels.
      num_classes: 0 for an unconditional network; else a class-conditional one (classifier-free
        guidance, Ho & Salimans 2022) with a learned embedding of the label y in 0..num_classes-1
        or of the null label num_classes, added to the timestep embedding.
    """
    out_ch: int = 3
    num_classes: int = 0

    @property
    def label_classes(self) -> int:
        """Classes of the label input (what `encode` embeds)."""
        return self.num_classes

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, train: bool = False, *,
                 y: jax.Array | None = None) -> jax.Array:
        """Applies the network.

        Args:
          x: [B, H, W, C] noisy images x_t, H == W.
          t: [B] timesteps, int or float.
          train: enables dropout (needs the 'dropout' rng).
          y: [B] int class labels, needed iff num_classes > 0; label num_classes is the null
            label ∅ of classifier-free guidance.

        Returns:
          float32 array of shape [B, H, W, out_ch].
        """
        h, hs, temb = encode(self, x, t, train, y)
        groups, conv_backward, dtypes = self.num_groups, self.conv_backward, layers.dtypes(self)

        # Upsampling; one more block per level than on the way down consumes the downsample skips.
        for i in reversed(range(len(self.ch_mult))):
            for j in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = _maybe_attn(self, _resnet(self, self.ch_mult[i], f'up_{i}_block_{j}')(
                    h, temb, train), f'up_{i}_attn_{j}')
            if i != 0:
                h = layers.Upsample(self.resamp_with_conv, conv_backward=conv_backward,
                                    name=f'up_{i}_upsample', **dtypes)(h)
        assert not hs, 'every skip connection is consumed'

        h = nn.swish(layers.group_norm(groups, name='norm_out', **dtypes)(h))
        h = layers.conv3x3(self.out_ch, name='conv_out', scale=0.0, conv_backward=conv_backward,
                           **dtypes)(h)
        return h.astype(jnp.float32)


def _resnet(m, mult, name):
    return layers.ResnetBlock(m.ch * mult, m.dropout, m.num_groups,
                              conv_backward=m.conv_backward, name=name, **layers.dtypes(m))


def _maybe_attn(m, h, name):
    if h.shape[1] not in m.attn_resolutions:
        return h
    return layers.AttnBlock(m.num_groups, name=name, **layers.dtypes(m))(h)


def encode(m, x, t, train, y=None):
    """The downsampling half and the middle of the U-Net, shared with the noise-aware classifier.

    Called inside the compact `__call__` of `m` (a `UNet` or `models.NoisyClassifier`), so the
    submodules it creates are `m`'s own, with the names of the paper's checkpoints.

    Returns:
      (the middle block's output, the skip connections, the timestep (+ label) embedding).
    """
    t = jnp.asarray(t)
    if x.ndim != 4 or x.shape[1] != x.shape[2]:
        raise ValueError(f'x must have shape [B, H, W, C] with H == W, got shape {x.shape}')
    if t.shape != (x.shape[0],):
        raise ValueError(f't must have shape [B] = ({x.shape[0]},), got shape {t.shape}')
    if x.shape[1] % 2 ** (len(m.ch_mult) - 1):
        raise ValueError(f'image size {x.shape[1]} cannot be halved {len(m.ch_mult) - 1} '
                         f'times evenly, as ch_mult={m.ch_mult} needs')
    dtypes = layers.dtypes(m)
    temb = layers.get_timestep_embedding(t, m.ch)
    temb = layers.nin(m.ch * 4, name='temb_dense0', **dtypes)(temb)
    temb = layers.nin(m.ch * 4, name='temb_dense1', **dtypes)(nn.swish(temb))
    temb = temb + _label_embedding(m, y, x.shape[0])

    # Downsampling; every intermediate output is kept as a skip connection.
    hs = [layers.conv3x3(m.ch, name='conv_in', conv_backward=m.conv_backward,
                         **dtypes)(x.astype(m.dtype))]
    for i, mult in enumerate(m.ch_mult):
        for j in range(m.num_res_blocks):
            h = _resnet(m, mult, f'down_{i}_block_{j}')(hs[-1], temb, train)
            hs.append(_maybe_attn(m, h, f'down_{i}_attn_{j}'))
        if i != len(m.ch_mult) - 1:
            down = layers.Downsample(m.resamp_with_conv, name=f'down_{i}_downsample', **dtypes)
            hs.append(down(hs[-1]))

    h = _resnet(m, m.ch_mult[-1], 'mid_block_1')(hs[-1], temb, train)
    h = layers.AttnBlock(m.num_groups, name='mid_attn_1', **dtypes)(h)
    h = _resnet(m, m.ch_mult[-1], 'mid_block_2')(h, temb, train)
    return h, hs, temb


def _label_embedding(m, y, batch_size):
    """Classifier-free guidance's label embedding, added to the timestep embedding (0 if
    unconditional). Row num_classes is the learned null label ∅."""
    num_classes = getattr(m, 'label_classes', 0)
    if not num_classes:
        if y is not None:
            raise ValueError('labels y were given to an unconditional network: set '
                             'model.num_classes > 0 to train a class-conditional one')
        return 0.0
    if y is None or jnp.shape(y) != (batch_size,):
        raise ValueError(f'a class-conditional network (num_classes={num_classes}) needs labels '
                         f'y of shape [B] = ({batch_size},), got '
                         f'{None if y is None else jnp.shape(y)}')
    return nn.Embed(num_classes + 1, m.ch * 4, param_dtype=m.param_dtype,
                    name='label_emb')(jnp.asarray(y, jnp.int32))

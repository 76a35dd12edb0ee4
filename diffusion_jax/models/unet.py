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


class UNet(nn.Module):
    """eps_theta(x_t, t): predicts the noise (or, with out_ch = 2C, noise and variance).

    Attributes:
      ch: base channel count; also the timestep embedding dimension (the MLP widens it to 4ch).
      out_ch: output channels.
      ch_mult: channel multiplier per resolution level; one downsample between levels.
      num_res_blocks: ResnetBlocks per level on the way down (one more on the way up).
      attn_resolutions: spatial sizes after whose ResnetBlocks an AttnBlock is inserted.
      dropout: dropout rate inside the ResnetBlocks (active only when train=True).
      resamp_with_conv: convolutions in Downsample/Upsample (else avg-pool / plain resize).
      num_groups: GroupNorm groups.
      dtype: compute dtype; parameters stay float32 and the output is float32.
      conv_backward: how the 3x3 convolutions are differentiated: 'xla', 'matmul' (faster on
        the CPU for wide layers, same gradient; models/conv.py) or 'auto' (matmul on the CPU for
        layers of >= 64 channels, else xla).
    """
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    num_groups: int = 32
    dtype: Any = jnp.float32
    conv_backward: str = 'xla'

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, train: bool = False) -> jax.Array:
        """Applies the network.

        Args:
          x: [B, H, W, C] noisy images x_t, H == W.
          t: [B] timesteps, int or float.
          train: enables dropout (needs the 'dropout' rng).

        Returns:
          float32 array of shape [B, H, W, out_ch].
        """
        t = jnp.asarray(t)
        if x.ndim != 4 or x.shape[1] != x.shape[2]:
            raise ValueError(f'x must have shape [B, H, W, C] with H == W, got shape {x.shape}')
        if t.shape != (x.shape[0],):
            raise ValueError(f't must have shape [B] = ({x.shape[0]},), got shape {t.shape}')
        if x.shape[1] % 2 ** (len(self.ch_mult) - 1):
            raise ValueError(f'image size {x.shape[1]} cannot be halved {len(self.ch_mult) - 1} '
                             f'times evenly, as ch_mult={self.ch_mult} needs')
        dtype, groups, conv_backward = self.dtype, self.num_groups, self.conv_backward

        def resnet(mult, name):
            return layers.ResnetBlock(self.ch * mult, self.dropout, groups, dtype, conv_backward,
                                      name=name)

        def maybe_attn(h, name):
            if h.shape[1] not in self.attn_resolutions:
                return h
            return layers.AttnBlock(groups, dtype, name=name)(h)

        temb = layers.get_timestep_embedding(t, self.ch)
        temb = layers.nin(self.ch * 4, name='temb_dense0', dtype=dtype)(temb)
        temb = layers.nin(self.ch * 4, name='temb_dense1', dtype=dtype)(nn.swish(temb))

        # Downsampling; every intermediate output is kept as a skip connection.
        hs = [layers.conv3x3(self.ch, name='conv_in', dtype=dtype,
                             conv_backward=conv_backward)(x.astype(dtype))]
        for i, mult in enumerate(self.ch_mult):
            for j in range(self.num_res_blocks):
                h = resnet(mult, f'down_{i}_block_{j}')(hs[-1], temb, train)
                hs.append(maybe_attn(h, f'down_{i}_attn_{j}'))
            if i != len(self.ch_mult) - 1:
                down = layers.Downsample(self.resamp_with_conv, dtype, name=f'down_{i}_downsample')
                hs.append(down(hs[-1]))

        h = resnet(self.ch_mult[-1], 'mid_block_1')(hs[-1], temb, train)
        h = layers.AttnBlock(groups, dtype, name='mid_attn_1')(h)
        h = resnet(self.ch_mult[-1], 'mid_block_2')(h, temb, train)

        # Upsampling; one more block per level than on the way down consumes the downsample skips.
        for i in reversed(range(len(self.ch_mult))):
            for j in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = maybe_attn(resnet(self.ch_mult[i], f'up_{i}_block_{j}')(h, temb, train),
                               f'up_{i}_attn_{j}')
            if i != 0:
                h = layers.Upsample(self.resamp_with_conv, dtype, conv_backward,
                                    name=f'up_{i}_upsample')(h)
        assert not hs, 'every skip connection is consumed'

        h = nn.swish(layers.group_norm(groups, name='norm_out')(h))
        h = layers.conv3x3(self.out_ch, name='conv_out', dtype=dtype, scale=0.0,
                           conv_backward=conv_backward)(h)
        return h.astype(jnp.float32)

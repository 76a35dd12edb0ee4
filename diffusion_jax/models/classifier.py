"""The noise-aware classifier p_φ(y | x_t, t) of classifier guidance (Dhariwal & Nichol 2021, §4).

The U-Net's downsampling half and middle (`unet.encode`, conditioned on t through the same
timestep embedding) followed by a pooled head: GroupNorm, swish, global average pooling and a
dense layer to the class logits. It is trained on noised inputs x_t = q_sample(x_0, t, ε) with
the cross-entropy of the true label (`losses.make_classifier_loss`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers
from diffusion_jax.models import unet


class NoisyClassifier(unet.EncoderFields):
    """logits of p(y | x_t, t). Attributes: the U-Net encoder's (`unet.EncoderFields`), plus
    `num_classes`, the number of logits."""
    num_classes: int = 10

    label_classes = 0  # The classifier is not itself conditioned on a label.

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, train: bool = False) -> jax.Array:
        """[B, H, W, C] x_t and [B] timesteps -> logits [B, num_classes] (at least float32)."""
        h, _, _ = unet.encode(self, x, t, train)
        h = nn.swish(layers.group_norm(self.num_groups, name='norm_out', **layers.dtypes(self))(h))
        h = jnp.mean(h, axis=(1, 2), dtype=jnp.promote_types(self.dtype, jnp.float32))
        return nn.Dense(self.num_classes, dtype=h.dtype, param_dtype=self.param_dtype,
                        name='head')(h)

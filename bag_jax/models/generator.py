"""The GDFQ/AdaDFQ conditional generator (spec 3); quantized, it is BAG's bit-width aware generator.

    h = Embed(y) * z -> Linear(latent -> 128 * H/4 * W/4) -> reshape -> BN
      -> up x2 -> conv3x3(128) -> BN(eps 0.8) -> LeakyReLU(0.2) [-> QuantAct]
      -> up x2 -> conv3x3(64)  -> BN(eps 0.8) -> LeakyReLU(0.2) [-> QuantAct]
      -> conv3x3(C) -> tanh -> BN without affine parameters

Every BN normalizes with the batch's own statistics, always (the reference generator never
leaves train mode). The output is an image batch in the teacher's normalized input domain,
(B, H, W, C).

Two ways to condition on the label y (`conditioning`):
  'embedding'  the CIFAR generator: z is multiplied by a label embedding, the BNs have one
               scale and bias per channel (spec 3);
  'batchnorm'  the ImageNet generator (spec imagenet.md 3): z goes in as it is, and each of the
               three hidden BNs is a conditional BN: affine-free, then a per-class scale
               (initialized to 1) and bias (0) looked up by y. At 224x224 its first layer
               alone has 40.5M of its 41.4M parameters.

BAG (spec 8.2a, our reading of the paper): `w_bits` fake-quantizes the weights of the linear
layer and the three convs per output channel with the student's quantizer; the label embedding,
the (conditional) BNs and the output stay full precision. `a_bits` optionally adds a QuantAct after each
LeakyReLU (a signed range; the asymmetric quantizer handles it).
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bag_jax import quant
from bag_jax.models import layers

BASE_CHANNELS = 128
BN_EPSILON = 1e-5
CONV_BN_EPSILON = 0.8   # nn.BatchNorm2d(128, 0.8): the second positional argument is eps (spec 9.1)
LEAKY_SLOPE = 0.2


def _upsample2x(x):
    """Nearest-neighbour x2 upsampling of an NHWC batch (F.interpolate(scale_factor=2))."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


CONDITIONINGS = ('embedding', 'batchnorm')


class ConditionalBatchStatNorm(nn.Module):
    """Conditional BatchNorm (the reference's CategoricalConditionalBatchNorm2d, always in train
    mode): batch-statistics normalization without affine parameters, then per-sample scale[y]
    and bias[y] from (num_classes, C) tables initialized to 1 and 0."""
    num_classes: int
    epsilon: float = BN_EPSILON

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        x = layers.BatchStatNorm(self.epsilon, affine=False)(x)
        features = x.shape[-1]
        scale = self.param('scale', nn.initializers.ones, (self.num_classes, features))
        bias = self.param('bias', nn.initializers.zeros, (self.num_classes, features))
        return x * scale[y][:, None, None, :] + bias[y][:, None, None, :]


class Generator(nn.Module):
    """Label-conditioned generator. `__call__(z (B, latent_dim), y (B,) int, calibrate=False)`
    returns images (B, H, W, C) for `image_shape = (H, W, C)`.

    Sizes that are not multiples of 4 are generated at the next multiple and center-cropped
    before the final normalization. `calibrate` updates the QuantAct ranges when `a_bits` is set.
    """
    num_classes: int
    image_shape: tuple[int, int, int]
    latent_dim: int = 100
    w_bits: Optional[int] = None
    a_bits: Optional[int] = None
    range_rule: str = 'reference'
    ste: str = 'identity'
    conditioning: str = 'embedding'

    def _norm(self, x, y, epsilon: float, name: str):
        if self.conditioning == 'batchnorm':
            return ConditionalBatchStatNorm(self.num_classes, epsilon, name=name)(x, y)
        return layers.BatchStatNorm(epsilon, name=name)(x)

    def _conv(self, features: int, fan_in: int, name: str) -> nn.Conv:
        return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=True,
                       kernel_init=layers.torch_default_kernel_init,
                       bias_init=layers.torch_default_bias_init(fan_in),
                       conv_general_dilated=quant.quantized_conv(self.w_bits, self.ste), name=name)

    def _act(self, x, calibrate: bool, name: str):
        x = nn.leaky_relu(x, LEAKY_SLOPE)
        return quant.QuantAct(self.a_bits, self.range_rule, self.ste, name=name)(x, calibrate)

    @nn.compact
    def __call__(self, z: jax.Array, y: jax.Array, calibrate: bool = False) -> jax.Array:
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f'generator.conditioning={self.conditioning!r}; allowed: {", ".join(CONDITIONINGS)}.')
        height, width, channels = self.image_shape
        h0, w0 = math.ceil(height / 4), math.ceil(width / 4)
        x = z
        if self.conditioning == 'embedding':
            x = nn.Embed(self.num_classes, self.latent_dim, embedding_init=nn.initializers.normal(1.0),
                         name='label_emb')(y) * z
        x = nn.Dense(BASE_CHANNELS * h0 * w0, kernel_init=layers.torch_default_kernel_init,
                     bias_init=layers.torch_default_bias_init(self.latent_dim),
                     dot_general=quant.quantized_dot_general(self.w_bits, self.ste), name='l1')(x)
        # PyTorch views the linear output as (B, 128, h0, w0): channel-major, then NCHW -> NHWC.
        x = x.reshape(x.shape[0], BASE_CHANNELS, h0, w0).transpose(0, 2, 3, 1)
        x = self._norm(x, y, BN_EPSILON, 'bn0')
        x = _upsample2x(x)
        x = self._conv(BASE_CHANNELS, BASE_CHANNELS * 9, 'conv1')(x)
        x = self._norm(x, y, CONV_BN_EPSILON, 'bn1')
        x = self._act(x, calibrate, 'act_quant1')
        x = _upsample2x(x)
        x = self._conv(BASE_CHANNELS // 2, BASE_CHANNELS * 9, 'conv2')(x)
        x = self._norm(x, y, CONV_BN_EPSILON, 'bn2')
        x = self._act(x, calibrate, 'act_quant2')
        x = self._conv(channels, BASE_CHANNELS // 2 * 9, 'conv3')(x)
        x = jnp.tanh(x)
        top, left = (x.shape[1] - height) // 2, (x.shape[2] - width) // 2
        x = x[:, top:top + height, left:left + width, :]
        return layers.BatchStatNorm(BN_EPSILON, affine=False, name='bn_out')(x)

"""The GDFQ/AdaDFQ conditional generator (docs/algorithms.md 3); quantized, it is BAG's bit-width aware generator.

    h = Embed(y) * z -> Linear(latent -> 128 * H/4 * W/4) -> reshape -> BN
      -> up x2 -> conv3x3(128) -> BN(eps 0.8) -> LeakyReLU(0.2) [-> QuantAct]
      -> up x2 -> conv3x3(64)  -> BN(eps 0.8) -> LeakyReLU(0.2) [-> QuantAct]
      -> conv3x3(C) -> tanh -> BN without affine parameters

Every BN normalizes with the batch's own statistics, always (the reference generator never
leaves train mode). The output is an image batch in the teacher's normalized input domain,
(B, H, W, C).

Two ways to condition on the label y (`conditioning`):
  'embedding'  the CIFAR generator: z is multiplied by a label embedding, the BNs have one
               scale and bias per channel (docs/algorithms.md 3);
  'batchnorm'  the ImageNet generator (docs/imagenet.md 3): z goes in as it is, and each of the
               three hidden BNs is a conditional BN: affine-free, then a per-class scale
               (initialized to 1) and bias (0) looked up by y. At 224x224 its first layer
               alone has 40.5M of its 41.4M parameters.

The two "up x2 -> conv3x3" layers are computed as sub-pixel convolutions (`upsample2x_conv`):
the same function up to float rounding, without the upsampled image, 2.25x fewer multiply-adds.

BAG (docs/algorithms.md 8.2a, our reading of the paper): `quant.w_bits` fake-quantizes the weights of the linear
layer and the three convs per output channel with the student's quantizer; the label embedding,
the (conditional) BNs and the output stay full precision. `quant.a_bits` optionally adds a QuantAct after each
LeakyReLU (a signed range; the asymmetric quantizer handles it).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bag_jax.quant import QuantAct, QuantSpec, quantized_conv, quantized_dot_general
from bag_jax.models import layers

BASE_CHANNELS = 128
BN_EPSILON = 1e-5
CONV_BN_EPSILON = 0.8   # nn.BatchNorm2d(128, 0.8): the second positional argument is eps (docs/algorithms.md 9.1)
LEAKY_SLOPE = 0.2


_NHWC = ('NHWC', 'HWIO', 'NHWC')
# Which input pixel each tap of a 3x3 conv (padding 1) reads on a nearest-x2 upsampled image:
# output row 2i + a, tap dy reads upsampled row 2i + a + dy - 1, i.e. input row i + (a + dy - 1) // 2.
# For a = 0 the taps (0, 1, 2) fall on input rows (i - 1, i, i), for a = 1 on (i, i, i + 1): two
# rows each. _PHASE_TAPS[a, r, dy] = 1 where tap dy of phase a reads the r-th of those two rows.
_PHASE_TAPS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)


def _lax_valid_conv(padded, kernel, precision=None):
    return jax.lax.conv_general_dilated(padded, kernel, (1, 1), 'VALID', dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _valid_conv(padded, kernel, precision=None):
    """A VALID, stride-1 convolution (NHWC, HWIO) whose kernel gradient is matmuls.

    XLA:CPU computes a convolution's kernel gradient as another convolution whose window is the
    output's spatial size; for the generator's layers that is slow: at batch 200 its second layer
    spent 0.6 s per iteration there and its last (64 -> 3 channels) 0.11 s (bench/NOTES.md). The
    gradient of tap (r, s) is the sum over (n, y, x) of input[n, y + r, x + s] x cotangent[n, y, x]:
    one matmul per tap with the input shifted along its flattened (n, y, x) axis, or, when the
    output has fewer channels, one matmul of the input with the shifted cotangents side by side. The
    input gradient stays XLA's transposed convolution. Used by the generator only: in the
    classifiers' 16-64-channel convs it was faster alone at 16-32 channels but made the whole
    iteration 1.2-1.3x slower (bench/NOTES.md).
    """
    return _lax_valid_conv(padded, kernel, precision)


def _valid_conv_forward(padded, kernel, precision):
    return _valid_conv(padded, kernel, precision), (padded, kernel)


def _valid_conv_backward(precision, residuals, cotangent):
    padded, kernel = residuals
    kh, kw, in_features, out_features = kernel.shape
    _, input_vjp = jax.vjp(lambda x: _lax_valid_conv(x, kernel, precision), padded)
    # On the input's (n, y, x) grid flattened to one axis, tap (r, s) is a shift by r * W + s rows:
    # with the cotangent zero-padded to that grid, input[n, y + r, x + s] x cotangent[n, y, x]
    # summed over (n, y, x) is x[q + shift] x g[q] summed over q, never crossing into another row
    # or image (g is zero there). The shifted operands are contiguous slices, no strided copies.
    height, width = padded.shape[1:3]
    h, w = cotangent.shape[1:3]
    x = padded.reshape(-1, in_features)
    g = jnp.pad(cotangent, ((0, 0), (0, height - h), (0, width - w), (0, 0))).reshape(-1, out_features)
    shifts = [r * width + s for r in range(kh) for s in range(kw)]
    last = shifts[-1]
    if in_features <= out_features:     # shift the input: one (in, out) matmul per tap
        # Padded so every tap's operands have g's length; x[k:] with g[:len(g) - k], the same sums
        # without the pad, ran 1.3-1.8x slower (bench/NOTES.md).
        x = jnp.pad(x, ((0, last), (0, 0)))
        grad = jnp.stack([jnp.dot(x[k:k + len(g)].T, g, precision=precision) for k in shifts])
        grad = grad.reshape(kernel.shape)
    else:                               # shift the cotangent: one matmul with the taps side by side
        g = jnp.pad(g, ((last, 0), (0, 0)))
        shifted = jnp.concatenate([g[last - k:last - k + len(x)] for k in shifts], -1)
        grad = jnp.dot(x.T, shifted, precision=precision)
        grad = grad.reshape(in_features, kh, kw, out_features).transpose(1, 2, 0, 3)
    return input_vjp(cotangent)[0], grad


_valid_conv.defvjp(_valid_conv_forward, _valid_conv_backward)


def _check_conv_call(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                     feature_group_count, name):
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    if (rhs.shape[:2] != (3, 3) or tuple(window_strides) != (1, 1) or tuple(map(tuple, padding)) != ((1, 1), (1, 1))
            or tuple(lhs_dilation or (1, 1)) != (1, 1) or tuple(rhs_dilation or (1, 1)) != (1, 1)
            or feature_group_count != 1 or (dimension_numbers is not None and dimension_numbers != dn)):
        raise ValueError(f'{name} computes a 3x3, stride-1, padding-1, ungrouped NHWC/HWIO conv only')


def _pad1(x):
    return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


def conv3x3(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
            feature_group_count=1, precision=None):
    """`lax.conv_general_dilated` for the generator's 3x3 convs (stride 1, padding 1, NHWC/HWIO),
    the same function with the kernel gradient of `_valid_conv`."""
    _check_conv_call(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                     feature_group_count, 'conv3x3')
    return _valid_conv(_pad1(lhs), rhs, precision)


def upsample2x_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                    dimension_numbers=None, feature_group_count=1, precision=None):
    """`lax.conv_general_dilated(upsample2x(lhs), rhs, ...)` for the generator's 3x3 convs
    (stride 1, padding 1, NHWC/HWIO), computed without building the upsampled image: a sub-pixel
    convolution. Each of the four output phases (row parity a, column parity c) is a 2x2 conv of
    the low-resolution input with the 3x3 kernel's taps summed by `_PHASE_TAPS`; one 2x2 conv of
    the zero-padded input with the four phase kernels side by side (4x the output channels) gives
    all four, which are then interleaved. The same sums up to float rounding, 2.25x fewer
    multiply-adds; with `_valid_conv`'s kernel gradient XLA:CPU runs the generator's two such
    layers forward and backward 2-5x faster than the conv of the upsampled image (bench/NOTES.md).
    The call signature is `lax.conv_general_dilated`'s, so it drops into `nn.Conv` (through
    `quantized_conv`, which quantizes the 3x3 kernel first) and keeps its parameters.
    """
    _check_conv_call(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                     feature_group_count, 'upsample2x_conv')
    batch, height, width, _ = lhs.shape
    features = rhs.shape[-1]
    taps = jnp.asarray(_PHASE_TAPS, rhs.dtype)
    # (2, 2, I, O) per phase (a, c), side by side as (2, 2, I, 2 * 2 * O).
    kernel = jnp.einsum('ary,csx,yxio->rsiaco', taps, taps, rhs).reshape(2, 2, rhs.shape[2], 4 * features)
    z = _valid_conv(_pad1(lhs), kernel, precision)
    z = z.reshape(batch, height + 1, width + 1, 2, 2, features)
    # Phase (a, c) of output pixel (i, j) is z[i + a, j + c, a, c].
    phases = [[z[:, a:a + height, c:c + width, a, c] for c in range(2)] for a in range(2)]
    y = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)    # (B, H, 2, W, 2, O)
    return y.reshape(batch, 2 * height, 2 * width, features)


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
    before the final normalization. `calibrate` updates the QuantAct ranges when `quant.a_bits` is set.
    """
    num_classes: int
    image_shape: tuple[int, int, int]
    latent_dim: int = 100
    conditioning: str = 'embedding'
    # BAG: weights at quant.w_bits; with quant.a_bits also a QuantAct after each LeakyReLU.
    quant: Optional[QuantSpec] = None    # None: full precision

    @property
    def quant_spec(self) -> QuantSpec:
        return self.quant or QuantSpec()

    def _norm(self, x, y, epsilon: float, name: str):
        if self.conditioning == 'batchnorm':
            return ConditionalBatchStatNorm(self.num_classes, epsilon, name=name)(x, y)
        return layers.BatchStatNorm(epsilon, name=name)(x)

    def _conv(self, features: int, fan_in: int, name: str, upsample: bool = False) -> nn.Conv:
        """A 3x3 conv (padding 1, bias); with `upsample`, of the input upsampled x2 (nearest)."""
        conv = upsample2x_conv if upsample else conv3x3
        return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=True,
                       kernel_init=layers.torch_default_kernel_init,
                       bias_init=layers.torch_default_bias_init(fan_in),
                       conv_general_dilated=quantized_conv(self.quant_spec.w_bits, self.quant_spec.ste, conv), name=name)

    def _act(self, x, calibrate: bool, name: str):
        x = nn.leaky_relu(x, LEAKY_SLOPE)
        return QuantAct.of(self.quant_spec, name=name)(x, calibrate)

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
                     dot_general=quantized_dot_general(self.quant_spec.w_bits, self.quant_spec.ste), name='l1')(x)
        # PyTorch views the linear output as (B, 128, h0, w0): channel-major, then NCHW -> NHWC.
        x = x.reshape(x.shape[0], BASE_CHANNELS, h0, w0).transpose(0, 2, 3, 1)
        x = self._norm(x, y, BN_EPSILON, 'bn0')
        x = self._conv(BASE_CHANNELS, BASE_CHANNELS * 9, 'conv1', upsample=True)(x)
        x = self._norm(x, y, CONV_BN_EPSILON, 'bn1')
        x = self._act(x, calibrate, 'act_quant1')
        x = self._conv(BASE_CHANNELS // 2, BASE_CHANNELS * 9, 'conv2', upsample=True)(x)
        x = self._norm(x, y, CONV_BN_EPSILON, 'bn2')
        x = self._act(x, calibrate, 'act_quant2')
        x = self._conv(channels, BASE_CHANNELS // 2 * 9, 'conv3')(x)
        x = jnp.tanh(x)
        top, left = (x.shape[1] - height) // 2, (x.shape[2] - width) // 2
        x = x[:, top:top + height, left:left + width, :]
        return layers.BatchStatNorm(BN_EPSILON, affine=False, name='bn_out')(x)

"""Small pieces shared by the classifiers and the generator: PyTorch's default initializers, a
batch-statistics normalization, and pytorchcv's conv-BN-activation block with its sown BN input."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bag_jax.quant import QuantAct, QuantSpec, quantized_conv, quantized_dot_general

# PyTorch's default Linear/Conv2d init, kaiming_uniform(a=sqrt(5)), is U(+-1/sqrt(fan_in)) for the
# weight; the bias is U(+-1/sqrt(fan_in)) too (docs/algorithms.md 3).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
# pytorchcv's CIFARResNet, ResNet and MobileNetV2 re-initialize their convs with kaiming_uniform_
# (gain sqrt(2); fan_in counts one group's input channels, as Flax's does).
kaiming_uniform_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'uniform')


def torch_default_bias_init(fan_in: int):
    """Returns an initializer drawing U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's bias default."""
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class BatchStatNorm(nn.Module):
    """BatchNorm that always normalizes with the statistics of the batch it is given.

    This is PyTorch's BatchNorm2d in train() mode, as the GDFQ generator always is (docs/algorithms.md 3): the
    running statistics are never read, so none are kept. Mean and biased variance are taken over
    every axis but the last (channels). Returns an array of x's shape.
    """
    epsilon: float = 1e-5
    affine: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(x, axis=axes)
        var = jnp.mean(jnp.square(x - mean), axis=axes)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.affine:
            features = x.shape[-1]
            y = y * self.param('scale', nn.initializers.ones, (features,))
            y = y + self.param('bias', nn.initializers.zeros, (features,))
        return y


# pytorchcv's BatchNorm2d: eps 1e-5 (docs/algorithms.md 1.2, docs/imagenet.md 2); PyTorch's momentum 0.1 is Flax's 0.9
# (Flax weights the old running value, docs/algorithms.md 9.13).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9
ACTIVATIONS = ('relu', 'relu6', None)


def keep(module: nn.Module, collection: str, name: str, value) -> None:
    """Stores `value` in `collection` if the caller made it mutable; never at init, never twice."""
    if not module.is_initializing():
        module.sow(collection, name, value, reduce_fn=lambda _, new: new, init_fn=lambda: None)


class ConvBlock(nn.Module):
    """conv -> BN [-> ReLU/ReLU6 -> QuantAct]: pytorchcv's ConvBlock (bias-free conv, padding k//2).

    `groups` > 1 is a grouped conv (groups = channels: MobileNetV2's depthwise 3x3, HWIO kernel
    (k, k, 1, C)). The kernel is fake-quantized per output channel when `quant.w_bits` is set; a
    QuantAct follows the activation, and only the activation (docs/algorithms.md 2.1, docs/imagenet.md 4). The BN's
    input is sown as 'bn_inputs'/`input` next to the BN `bn` (see `bn_input_pairs`).
    """
    features: int
    kernel_size: int
    strides: int
    activation: Optional[str]
    groups: int = 1
    quant: Optional[QuantSpec] = None    # None: full precision

    @property
    def quant_spec(self) -> QuantSpec:
        return self.quant or QuantSpec()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, calibrate: bool) -> jax.Array:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f'ConvBlock.activation={self.activation!r}: use one of {ACTIVATIONS}.')
        pad = self.kernel_size // 2  # PyTorch's padding=k//2, symmetric; never 'SAME' (docs/algorithms.md 9.12)
        x = nn.Conv(self.features, (self.kernel_size, self.kernel_size), strides=self.strides,
                    padding=((pad, pad), (pad, pad)), feature_group_count=self.groups, use_bias=False,
                    kernel_init=kaiming_uniform_init,
                    conv_general_dilated=quantized_conv(self.quant_spec.w_bits, self.quant_spec.ste), name='conv')(x)
        # A no-op unless the caller passes a 'perturbations' collection: its VJP there is the
        # gradient with respect to this conv's output (Grad-CAM, bag_jax.step.grad_cam_inputs).
        if not self.is_initializing():    # init would make it a variable of every network
            x = self.perturb('input', x)
        keep(self, 'bn_inputs', 'input', x)
        x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                         use_fast_variance=False, name='bn')(x)
        if self.activation is not None:
            x = nn.relu(x) if self.activation == 'relu' else nn.relu6(x)
            x = QuantAct.of(self.quant_spec, name='act_quant')(x, calibrate)
        return x


def pooled_dense_head(x: jax.Array, num_classes: int, quant: Optional[QuantSpec]) -> jax.Array:
    """The ResNets' classifier: the global mean of the last feature map (B, H, W, C), then a
    Dense 'output' layer with PyTorch's default init, its kernel fake-quantized per output
    channel when `quant` sets w_bits. Call inside the network's compact __call__."""
    spec = quant or QuantSpec()
    x = jnp.mean(x, axis=(1, 2))
    fan_in = x.shape[-1]
    return nn.Dense(num_classes, kernel_init=torch_default_kernel_init, bias_init=torch_default_bias_init(fan_in),
                    dot_general=quantized_dot_general(spec.w_bits, spec.ste), name='output')(x)

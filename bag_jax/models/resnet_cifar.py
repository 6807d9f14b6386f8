"""pytorchcv's CIFAR ResNet (`resnetNN_cifarK`) in Flax linen, NHWC; teacher and student in one module.

Full precision (w_bits = a_bits = None) it is the teacher, numerically the pytorchcv network
(spec 1.2). With bit-widths it is the GDFQ/AdaDFQ student (spec 2.1): every conv and the dense
head are weight-quantized per output channel, the first and last layers included, and a QuantAct
follows every ReLU. BatchNorm, the residual add, pooling and the network input stay full
precision.

Module names follow pytorchcv's state-dict keys (`features.stage2.unit1.body.conv1.conv.weight`
is `stage2_unit1/conv1/conv/kernel`), so teacher weights convert, and copy to the student, as they
are.

Two collections are filled only when the caller makes them mutable (otherwise nothing is kept):
  * 'bn_inputs': the input of every BatchNorm, at the BN's path (`init_block/bn/input`), for the
    BN-statistics loss (spec 4.1); `bn_input_pairs` matches them with the BN running statistics;
  * 'features': each residual unit's conv-branch output before the add (`branch`, spec 8.2b) and
    the unit's output after its ReLU (and QuantAct) (`out`), for channel-attention distillation.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from bag_jax import quant
from bag_jax.models import layers

STAGE_CHANNELS = (16, 32, 64)
INIT_CHANNELS = 16
BN_EPSILON = 1e-5       # pytorchcv bn_eps (spec 1.2)
BN_MOMENTUM = 0.9       # PyTorch momentum 0.1 (Flax counts the other way, spec 9.13)


def units_per_stage(depth: int) -> int:
    """Residual units per stage of a basic-block CIFAR ResNet of this depth: (depth - 2) / 6."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f'teacher.depth={depth!r} is not a basic-block CIFAR ResNet depth: use 6n+2, e.g. 20, 32, 44, 56 or 110.')
    return (depth - 2) // 6


def _keep(module: nn.Module, collection: str, name: str, value) -> None:
    """Stores `value` in `collection` if the caller made it mutable; never at init, never twice."""
    if not module.is_initializing():
        module.sow(collection, name, value, reduce_fn=lambda _, new: new, init_fn=lambda: None)


class ConvBlock(nn.Module):
    """conv -> BN [-> ReLU -> QuantAct]: pytorchcv's ConvBlock (bias-free conv, explicit padding)."""
    features: int
    kernel_size: int
    strides: int
    activate: bool
    w_bits: Optional[int] = None
    a_bits: Optional[int] = None
    range_rule: str = 'reference'
    ste: str = 'identity'

    @nn.compact
    def __call__(self, x, train: bool, calibrate: bool):
        pad = self.kernel_size // 2  # PyTorch's padding=1 for 3x3, 0 for 1x1; never 'SAME' (spec 9.12)
        x = nn.Conv(self.features, (self.kernel_size, self.kernel_size), strides=self.strides,
                    padding=((pad, pad), (pad, pad)), use_bias=False,
                    kernel_init=layers.kaiming_uniform_init,
                    conv_general_dilated=quant.quantized_conv(self.w_bits, self.ste), name='conv')(x)
        _keep(self, 'bn_inputs', 'input', x)
        x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                         use_fast_variance=False, name='bn')(x)
        if self.activate:
            x = nn.relu(x)
            x = quant.QuantAct(self.a_bits, self.range_rule, self.ste, name='act_quant')(x, calibrate)
        return x


class ResUnit(nn.Module):
    """pytorchcv's basic ResUnit: y = ReLU(body(x) + identity(x)), body = conv3x3-BN-ReLU-conv3x3-BN."""
    features: int
    strides: int
    w_bits: Optional[int] = None
    a_bits: Optional[int] = None
    range_rule: str = 'reference'
    ste: str = 'identity'

    @nn.compact
    def __call__(self, x, train: bool, calibrate: bool):
        q = dict(w_bits=self.w_bits, a_bits=self.a_bits, range_rule=self.range_rule, ste=self.ste)
        branch = ConvBlock(self.features, 3, self.strides, True, **q, name='conv1')(x, train, calibrate)
        branch = ConvBlock(self.features, 3, 1, False, **q, name='conv2')(branch, train, calibrate)
        if x.shape[-1] != self.features or self.strides != 1:
            identity = ConvBlock(self.features, 1, self.strides, False, **q, name='identity_conv')(x, train, calibrate)
        else:
            identity = x
        _keep(self, 'features', 'branch', branch)
        y = nn.relu(branch + identity)
        y = quant.QuantAct(self.a_bits, self.range_rule, self.ste, name='act_quant')(y, calibrate)
        _keep(self, 'features', 'out', y)
        return y


class ResNetCifar(nn.Module):
    """CIFAR ResNet of depth 6n+2 (basic blocks, 16/32/64 channels), teacher or quantized student.

    Call: `logits = model.apply(variables, images, train=False, calibrate=False)` with images
    already normalized, float (B, H, W, C); returns (B, num_classes) logits.
      train:     BN normalizes with batch statistics and (if 'batch_stats' is mutable) updates its
                 running averages: full-precision teacher training only. The student always runs
                 with train=False, i.e. on the teacher's running statistics (spec 2.5).
      calibrate: QuantActs update their ranges from this batch (needs mutable 'quant_stats').
    """
    num_classes: int
    depth: int = 20
    w_bits: Optional[int] = None
    a_bits: Optional[int] = None
    range_rule: str = 'reference'
    ste: str = 'identity'

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, calibrate: bool = False) -> jax.Array:
        n = units_per_stage(self.depth)
        q = dict(w_bits=self.w_bits, a_bits=self.a_bits, range_rule=self.range_rule, ste=self.ste)
        x = ConvBlock(INIT_CHANNELS, 3, 1, True, **q, name='init_block')(x, train, calibrate)
        for stage, channels in enumerate(STAGE_CHANNELS, start=1):
            for unit in range(1, n + 1):
                strides = 2 if (unit == 1 and stage > 1) else 1
                x = ResUnit(channels, strides, **q, name=f'stage{stage}_unit{unit}')(x, train, calibrate)
        # pytorchcv's AvgPool2d(8) on the 8x8 map of a 32x32 input; a global mean for any size.
        x = jnp.mean(x, axis=(1, 2))
        fan_in = x.shape[-1]
        return nn.Dense(self.num_classes, kernel_init=layers.torch_default_kernel_init,
                        bias_init=layers.torch_default_bias_init(fan_in),
                        dot_general=quant.quantized_dot_general(self.w_bits, self.ste), name='output')(x)


def bn_input_pairs(bn_inputs, batch_stats) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    """Matches each sown BatchNorm input with that BN's running statistics.

    Returns [(input (B, H, W, C), running_mean (C,), running_var (C,)), ...], one per BN, in a
    fixed (sorted path) order.
    """
    inputs = traverse_util.flatten_dict(bn_inputs)
    stats = traverse_util.flatten_dict(batch_stats)
    pairs = []
    for path in sorted(inputs):
        bn_path = path[:-1] + ('bn',)
        pairs.append((inputs[path], stats[bn_path + ('mean',)], stats[bn_path + ('var',)]))
    return pairs


def unit_features(features, kind: str = 'branch') -> list[jax.Array]:
    """The sown residual-unit tensors of one kind ('branch' or 'out'), in network order."""
    units = sorted(features, key=lambda name: tuple(int(s) for s in name.replace('stage', '').split('_unit')))
    return [features[name][kind] for name in units]

"""pytorchcv's MobileNetV2 (`mobilenetv2_w1`) in Flax linen, NHWC; teacher and student in one module.

Full precision (quant None) it is numerically pytorchcv's network (docs/imagenet.md 2);
with bit-widths it is the GDFQ/AdaDFQ student (docs/imagenet.md 4): every conv (the stem, all 17
depthwise 3x3s and the 1x1 classifier included, 54 in all) is weight-quantized per output
channel, and a QuantAct follows every ReLU6 (36) and nothing else. The linear-bottleneck outputs,
the residual stream, pooling and the network input stay full precision.

Module names follow pytorchcv's state-dict keys without `features.`
(`features.stage2.unit1.conv2.conv.weight` is `stage2_unit1/conv2/conv/kernel`,
`features.final_block.bn.running_var` is batch_stats `final_block/bn/var`, `output.weight`
(classes, C, 1, 1) is `output/kernel` (1, 1, C, classes)).

Collections filled only when the caller makes them mutable (as in `resnet_cifar`):
  * 'bn_inputs': every BN's input at `.../input`, next to the BN `.../bn` (`bn_input_pairs`);
  * 'features': `stage{S}_unit{U}` sows `branch` (the unit's body output, the last 1x1's BN) and
    `out` (the unit's output: branch + input where there is a residual, else branch itself)
    (`unit_features`).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bag_jax.quant import QuantSpec, quantized_conv
from bag_jax.models import layers
from bag_jax.models.layers import ConvBlock
from bag_jax.models.resnet_imagenet import check_channels

EXPANSION = 6   # the inverted residual's mid width is 6 x its input width (docs/imagenet.md 2)


class LinearBottleneck(nn.Module):
    """pytorchcv's LinearBottleneck: 1x1 (in -> mid) -> BN -> ReLU6 -> depthwise 3x3 (stride) -> BN ->
    ReLU6 -> 1x1 (mid -> out) -> BN, plus the input if in == out and stride 1; no activation after.

    mid = 6 * in, or in without `expansion` (stage1 unit1, whose 1x1 pytorchcv keeps).
    """
    features: int
    strides: int
    expansion: bool
    quant: Optional[QuantSpec] = None    # None: full precision

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, calibrate: bool) -> jax.Array:
        in_features = x.shape[-1]
        mid = in_features * EXPANSION if self.expansion else in_features
        branch = ConvBlock(mid, 1, 1, 'relu6', quant=self.quant, name='conv1')(x, train, calibrate)
        branch = ConvBlock(mid, 3, self.strides, 'relu6', groups=mid, quant=self.quant, name='conv2')(branch, train, calibrate)
        branch = ConvBlock(self.features, 1, 1, None, quant=self.quant, name='conv3')(branch, train, calibrate)
        layers.keep(self, 'features', 'branch', branch)
        y = branch + x if (in_features == self.features and self.strides == 1) else branch
        layers.keep(self, 'features', 'out', y)
        return y


class MobileNetV2(nn.Module):
    """pytorchcv's MobileNetV2, teacher or quantized student.

    Fields: `channels` holds each stage's per-unit output widths (mobilenetv2_w1: ((16,), (24, 24),
    (32, 32, 32), (64, 64, 64, 64, 96, 96, 96), (160, 160, 160, 320))); `init_channels` the 3x3
    stride-2 stem's width; `final_channels` the last 1x1's. Unit 1 of every stage but the first has
    stride 2. The classifier is pytorchcv's bias-free 1x1 conv on the pooled features.

    Call: `logits = model.apply(variables, images, train=False, calibrate=False)` with normalized
    float images (B, H, W, 3) returns (B, num_classes). `train` and `calibrate` as in `ResNetCifar`.
    """
    num_classes: int
    channels: tuple = ()
    init_channels: int = 32
    final_channels: int = 1280
    quant: Optional[QuantSpec] = None    # None: full precision

    @property
    def quant_spec(self) -> QuantSpec:
        return self.quant or QuantSpec()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, calibrate: bool = False) -> jax.Array:
        check_channels(self.channels, 'MobileNetV2.channels')
        x = ConvBlock(self.init_channels, 3, 2, 'relu6', quant=self.quant, name='init_block')(x, train, calibrate)
        for stage, widths in enumerate(self.channels, start=1):
            for unit, features in enumerate(widths, start=1):
                strides = 2 if (unit == 1 and stage > 1) else 1
                x = LinearBottleneck(features, strides, expansion=(stage, unit) != (1, 1), quant=self.quant,
                                     name=f'stage{stage}_unit{unit}')(x, train, calibrate)
        x = ConvBlock(self.final_channels, 1, 1, 'relu6', quant=self.quant, name='final_block')(x, train, calibrate)
        # pytorchcv's AvgPool2d(7) on the 7x7 map of a 224x224 input; a global mean for any size.
        x = jnp.mean(x, axis=(1, 2), keepdims=True)
        logits = nn.Conv(self.num_classes, (1, 1), use_bias=False, kernel_init=layers.kaiming_uniform_init,
                         conv_general_dilated=quantized_conv(self.quant_spec.w_bits, self.quant_spec.ste), name='output')(x)
        return logits.reshape(logits.shape[0], self.num_classes)

"""pytorchcv's ImageNet ResNet (`resnet18`, `resnet50`) in Flax linen, NHWC; teacher and student in one module.

Full precision (quant None) it is numerically pytorchcv's network (docs/imagenet.md 2);
with bit-widths it is the GDFQ/AdaDFQ student (docs/imagenet.md 4): every conv (the 7x7 stem and the 1x1
shortcuts included) and the dense head are weight-quantized per output channel, and a QuantAct
follows every ReLU (17 in ResNet-18, 49 in ResNet-50) and nothing else. BatchNorm, the residual
add, the max pool's input domain, pooling and the network input stay full precision.

Module names follow pytorchcv's state-dict keys, without `features.` and `body.`
(`features.stage2.unit1.body.conv1.conv.weight` is `stage2_unit1/conv1/conv/kernel`,
`features.init_block.conv.bn.running_mean` is batch_stats `init_block/conv/bn/mean`).

Collections filled only when the caller makes them mutable (as in `resnet_cifar`):
  * 'bn_inputs': every BN's input at `.../input`, next to the BN `.../bn` (`bn_input_pairs`);
  * 'features': `stage{S}_unit{U}` sows `branch` (the body's output, before the add) and `out`
    (the unit's output after its ReLU and QuantAct) (`unit_features`).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax

from bag_jax.quant import QuantAct, QuantSpec
from bag_jax.models import layers
from bag_jax.models.layers import ConvBlock

BOTTLENECK_FACTOR = 4   # mid = out / 4 in a bottleneck unit (docs/imagenet.md 2)


class ResUnit(nn.Module):
    """pytorchcv's ResUnit: y = QuantAct(ReLU(body(x) + identity(x))).

    Basic body: conv3x3(stride)-BN-ReLU-conv3x3-BN. Bottleneck body (`conv1_stride=True`, the
    stride on the FIRST 1x1; docs/imagenet.md 2): conv1x1(stride)-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN,
    mid = features / 4. The identity is conv1x1(stride)-BN when the width or the size changes.
    Shared with `resnet_cifar` (basic), as pytorchcv's CIFARResNet reuses this unit.
    """
    features: int
    strides: int
    bottleneck: bool
    quant: Optional[QuantSpec] = None    # None: full precision

    @property
    def quant_spec(self) -> QuantSpec:
        return self.quant or QuantSpec()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, calibrate: bool) -> jax.Array:
        if self.bottleneck:
            mid = self.features // BOTTLENECK_FACTOR
            branch = ConvBlock(mid, 1, self.strides, 'relu', quant=self.quant, name='conv1')(x, train, calibrate)
            branch = ConvBlock(mid, 3, 1, 'relu', quant=self.quant, name='conv2')(branch, train, calibrate)
            branch = ConvBlock(self.features, 1, 1, None, quant=self.quant, name='conv3')(branch, train, calibrate)
        else:
            branch = ConvBlock(self.features, 3, self.strides, 'relu', quant=self.quant, name='conv1')(x, train, calibrate)
            branch = ConvBlock(self.features, 3, 1, None, quant=self.quant, name='conv2')(branch, train, calibrate)
        if x.shape[-1] != self.features or self.strides != 1:
            identity = ConvBlock(self.features, 1, self.strides, None, quant=self.quant, name='identity_conv')(x, train, calibrate)
        else:
            identity = x
        layers.keep(self, 'features', 'branch', branch)
        y = nn.relu(branch + identity)
        y = QuantAct.of(self.quant_spec, name='act_quant')(y, calibrate)
        layers.keep(self, 'features', 'out', y)
        return y


class ResInitBlock(nn.Module):
    """pytorchcv's ResInitBlock: conv7x7 s2 p3 -> BN -> ReLU (-> QuantAct) -> max pool 3 s2 p1."""
    features: int
    quant: Optional[QuantSpec] = None    # None: full precision

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, calibrate: bool) -> jax.Array:
        x = ConvBlock(self.features, 7, 2, 'relu', quant=self.quant, name='conv')(x, train, calibrate)
        # Flax pads a max pool with -inf, as PyTorch's MaxPool2d(padding=1) does.
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class ResNet(nn.Module):
    """pytorchcv's ImageNet ResNet (resnet18: basic units, resnet50: bottleneck units), teacher or
    quantized student.

    Fields: `channels` holds each stage's per-unit output widths, e.g. resnet18
    ((64, 64), (128, 128), (256, 256), (512, 512)), resnet50 ((256,) * 3, (512,) * 4, (1024,) * 6,
    (2048,) * 3); `init_channels` the stem's width; `bottleneck` the unit kind. Unit 1 of every
    stage but the first has stride 2.

    Call: `logits = model.apply(variables, images, train=False, calibrate=False)` with normalized
    float images (B, H, W, 3) (224x224 for the zoo's models; any size the strides allow) returns
    (B, num_classes). `train` and `calibrate` as in `ResNetCifar`.
    """
    num_classes: int
    channels: tuple = ()
    init_channels: int = 64
    bottleneck: bool = False
    quant: Optional[QuantSpec] = None    # None: full precision

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, calibrate: bool = False) -> jax.Array:
        check_channels(self.channels, 'ResNet.channels')
        x = ResInitBlock(self.init_channels, quant=self.quant, name='init_block')(x, train, calibrate)
        for stage, widths in enumerate(self.channels, start=1):
            for unit, features in enumerate(widths, start=1):
                strides = 2 if (unit == 1 and stage > 1) else 1
                x = ResUnit(features, strides, self.bottleneck, quant=self.quant,
                            name=f'stage{stage}_unit{unit}')(x, train, calibrate)
        # pytorchcv's AvgPool2d(7) on the 7x7 map of a 224x224 input; a global mean for any size.
        return layers.pooled_dense_head(x, self.num_classes, self.quant)


def check_channels(channels, field: str) -> None:
    """Raises ValueError naming `field` unless `channels` is a non-empty tuple of non-empty tuples
    of positive ints (per stage, per unit output widths)."""
    ok = isinstance(channels, tuple) and len(channels) > 0 and all(
        isinstance(stage, tuple) and len(stage) > 0
        and all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in stage) for stage in channels)
    if not ok:
        raise ValueError(f'{field}={channels!r} must be a non-empty tuple of stages, each a non-empty tuple '
                         'of positive unit widths, e.g. ((64, 64), (128, 128), (256, 256), (512, 512)).')

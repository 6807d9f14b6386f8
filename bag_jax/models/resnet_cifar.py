"""pytorchcv's CIFAR ResNet (`resnetNN_cifarK`) in Flax linen, NHWC; teacher and student in one module.

Full precision (quant None) it is the teacher, numerically the pytorchcv network
(docs/algorithms.md 1.2). With bit-widths it is the GDFQ/AdaDFQ student (docs/algorithms.md 2.1): every conv and the dense
head are weight-quantized per output channel, the first and last layers included, and a QuantAct
follows every ReLU. BatchNorm, the residual add, pooling and the network input stay full
precision.

Its residual unit is the ImageNet ResNet's (`resnet_imagenet.ResUnit`, basic), as in pytorchcv,
and its conv-BN-ReLU blocks are `layers.ConvBlock`.

Module names follow pytorchcv's state-dict keys (`features.stage2.unit1.body.conv1.conv.weight`
is `stage2_unit1/conv1/conv/kernel`), so teacher weights convert, and copy to the student, as they
are.

Two collections are filled only when the caller makes them mutable (otherwise nothing is kept):
  * 'bn_inputs': the input of every BatchNorm, at the BN's path (`init_block/bn/input`), for the
    BN-statistics loss (docs/algorithms.md 4.1); `bn_input_pairs` matches them with the BN running statistics;
  * 'features': each residual unit's conv-branch output before the add (`branch`, docs/algorithms.md 8.2b) and
    the unit's output after its ReLU (and QuantAct) (`out`), for channel-attention distillation.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
from flax import traverse_util

from bag_jax.models import layers
from bag_jax.quant import QuantSpec
from bag_jax.models.layers import ConvBlock
from bag_jax.models.resnet_imagenet import ResUnit

STAGE_CHANNELS = (16, 32, 64)
INIT_CHANNELS = 16


def units_per_stage(depth: int) -> int:
    """Residual units per stage of a basic-block CIFAR ResNet of this depth: (depth - 2) / 6."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f'teacher.depth={depth!r} is not a basic-block CIFAR ResNet depth: use 6n+2, e.g. 20, 32, 44, 56 or 110.')
    return (depth - 2) // 6


class ResNetCifar(nn.Module):
    """CIFAR ResNet of depth 6n+2 (basic blocks, 16/32/64 channels), teacher or quantized student.

    Call: `logits = model.apply(variables, images, train=False, calibrate=False)` with images
    already normalized, float (B, H, W, C); returns (B, num_classes) logits.
      train:     BN normalizes with batch statistics and (if 'batch_stats' is mutable) updates its
                 running averages: full-precision teacher training only. The student always runs
                 with train=False, i.e. on the teacher's running statistics (docs/algorithms.md 2.5).
      calibrate: QuantActs update their ranges from this batch (needs mutable 'quant_stats').
    """
    num_classes: int
    depth: int = 20
    quant: Optional[QuantSpec] = None    # None: full precision

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, calibrate: bool = False) -> jax.Array:
        n = units_per_stage(self.depth)
        x = ConvBlock(INIT_CHANNELS, 3, 1, 'relu', quant=self.quant, name='init_block')(x, train, calibrate)
        for stage, channels in enumerate(STAGE_CHANNELS, start=1):
            for unit in range(1, n + 1):
                strides = 2 if (unit == 1 and stage > 1) else 1
                x = ResUnit(channels, strides, bottleneck=False, quant=self.quant,
                            name=f'stage{stage}_unit{unit}')(x, train, calibrate)
        # pytorchcv's AvgPool2d(8) on the 8x8 map of a 32x32 input; a global mean for any size.
        return layers.pooled_dense_head(x, self.num_classes, self.quant)


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


def unit_index(name: str) -> tuple[int, int]:
    """(stage, unit) of a unit module named `stage{S}_unit{U}` (every architecture names its units so)."""
    stage, unit = name.replace('stage', '').split('_unit')
    return int(stage), int(unit)


def unit_features(features, kind: str = 'branch') -> list[jax.Array]:
    """The sown residual-unit tensors of one kind ('branch' or 'out'), in network order."""
    return [features[name][kind] for name in sorted(features, key=unit_index)]

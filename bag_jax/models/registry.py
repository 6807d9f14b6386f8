"""One place that maps a checkpoint's `arch` to its Flax module, and back.

Every classifier module (teacher or quantized student) is a linen dataclass with `num_classes`,
its own architecture fields (e.g. `depth`, `channels`), and one quantization field `quant`
(a `QuantSpec`, None for full precision). A checkpoint's JSON metadata holds `arch` plus the architecture fields
(`describe`); `build` turns that back into the module, quantized or not. Nothing downstream
(dfq, evaluate, export, bench) needs to know which architecture it holds: a student is
`quantized(teacher, spec)`, the teacher's own module with a QuantSpec.

Every architecture follows the same conventions, which the losses rely on:
  * `model.apply(variables, x_nhwc, train=False, calibrate=False)` gives the logits;
  * every BatchNorm sits in a module whose BN is named `bn` and which sows the BN's input as
    'bn_inputs'/.../`input` (`bn_input_pairs` pairs them with the running statistics);
  * every residual or inverted-residual unit is named `stage{S}_unit{U}` and sows 'features'
    `branch` (before the add) and `out` (the unit's output) (`unit_features`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from bag_jax.models.mobilenet_v2 import MobileNetV2
from bag_jax.models.resnet_cifar import ResNetCifar
from bag_jax.models.resnet_imagenet import ResNet
from bag_jax.quant import QuantSpec

ARCHITECTURES: dict[str, type[nn.Module]] = {
    'resnet_cifar': ResNetCifar,   # pytorchcv resnetNN_cifarK
    'resnet': ResNet,              # pytorchcv resnet18 / resnet50 (ImageNet)
    'mobilenetv2': MobileNetV2,    # pytorchcv mobilenetv2_w1 (ImageNet)
}
_NOT_ARCH = {'quant', 'parent', 'name'}


def _arch_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name not in _NOT_ARCH]


def _tuples(value):
    """JSON lists back to (nested) tuples, so that modules stay hashable."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _lists(value):
    return [_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


def arch_name(model: nn.Module) -> str:
    for name, cls in ARCHITECTURES.items():
        if type(model) is cls:
            return name
    raise ValueError(f'{type(model).__name__} is not a registered architecture ({", ".join(ARCHITECTURES)}).')


def describe(model: nn.Module) -> dict[str, Any]:
    """The JSON-serializable architecture of `model`: {'arch': name, field: value, ...}
    (quantization settings excluded)."""
    return {'arch': arch_name(model), **{f: _lists(getattr(model, f)) for f in _arch_fields(type(model))}}


def build(description: dict[str, Any], quant: QuantSpec | None = None) -> nn.Module:
    """The module that `describe` (or a checkpoint's metadata) describes, fake-quantized as
    `quant` says (None: full precision). Other keys of `description` are ignored."""
    arch = description.get('arch')
    if arch not in ARCHITECTURES:
        raise ValueError(f'arch={arch!r} is not a known architecture; known: {", ".join(ARCHITECTURES)}.')
    cls = ARCHITECTURES[arch]
    missing = [f for f in _arch_fields(cls) if f not in description and _has_no_default(cls, f)]
    if missing:
        raise ValueError(f'the description of a {arch!r} network lacks {missing}.')
    fields = {f: _tuples(description[f]) for f in _arch_fields(cls) if f in description}
    return cls(**fields, quant=quant)


def _has_no_default(cls, field: str) -> bool:
    f = next(f for f in dataclasses.fields(cls) if f.name == field)
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def quantized(model: nn.Module, quant: QuantSpec) -> nn.Module:
    """The student of `model`: the same architecture (and so the same variables) with weights and
    activations fake-quantized as `quant` says."""
    return build(describe(model), quant)


# The pytorchcv zoo networks the papers use, by their zoo name (docs/algorithms.md 1.1, docs/imagenet.md 1-2):
# enough to build each one (e.g. with random weights, for benchmarks) without its file.
PYTORCHCV_NETWORKS: dict[str, dict[str, Any]] = {
    'resnet20_cifar100': {'arch': 'resnet_cifar', 'depth': 20, 'num_classes': 100},
    'resnet20_cifar10': {'arch': 'resnet_cifar', 'depth': 20, 'num_classes': 10},
    'resnet18': {'arch': 'resnet', 'num_classes': 1000, 'init_channels': 64, 'bottleneck': False,
                 'channels': ((64,) * 2, (128,) * 2, (256,) * 2, (512,) * 2)},
    'resnet50': {'arch': 'resnet', 'num_classes': 1000, 'init_channels': 64, 'bottleneck': True,
                 'channels': ((256,) * 3, (512,) * 4, (1024,) * 6, (2048,) * 3)},
    'mobilenetv2_w1': {'arch': 'mobilenetv2', 'num_classes': 1000, 'init_channels': 32, 'final_channels': 1280,
                       'channels': ((16,), (24,) * 2, (32,) * 3, (64,) * 4 + (96,) * 3, (160,) * 3 + (320,))},
}

"""A quantized student as an ONNX model that onnxruntime runs with integer kernels.

`build(arrays, meta)` turns the integer form (`integer_inference.integer_form`, as weights.npz
holds it) into an ONNX graph (opset OPSET): uint8 images (batch, H, W, C) in, float32 logits
(batch, classes) out, the input normalized inside, as model.jax does. It computes what the
fake-quantized student computes, up to float rounding, for every architecture (CIFAR ResNet,
ResNet-18/50, MobileNetV2):

* **Weights** are held as their grid values v_w = q_w + z_w (`quant.quantize_to_grid`: the
  student's weight is v_w / s_w), per output channel: symmetric, one zero point for the whole
  tensor, which is what onnxruntime's ConvInteger takes (it refuses per-channel zero points).
  The integer operators take them as uint8 v_w + 128 with zero point 128 (WEIGHT_OFFSET: the
  same values, faster in onnxruntime), DequantizeLinear as int8 with zero point 0. For w_bits <= 7 the
  grid values of a channel whose range holds 0 lie in -(2^k - 1) .. 2^k - 1, so they always fit;
  8-bit grids (-255 .. 255) and channels whose range lies far from 0 are split into int8
  kernels whose sum is v_w (two or three integer convolutions, added in int32).
* **BatchNorm is folded** into the convolution: BN(conv(x, v_w / s_w)) is
  conv(x, v_w) * (g / s_w) + (beta - mean g), g = gamma / sqrt(var + eps) per output channel, so
  the int8 weights stay the grid values and only the per-channel scale changes (a negative g
  flips the channel's signs; its scale stays positive).
* **Activations** (each QuantAct's output) are held as their grid values v_a = q_a + z_a in
  uint8 with zero point 0 and scale 1 / s_a, per tensor: after a ReLU the calibrated range starts
  at 0, so v_a is 0 .. 2^k - 1. QuantizeLinear saturates to 0 .. 255, which is the ReLU; where
  the k-bit grid (a_bits < 8) or ReLU6's cap ends lower, an integer Clip on the uint8 tensor
  follows (quantization is monotone, so clipping the grid value is clipping the float input).
* **Convolutions** whose input is a quantized activation are ConvInteger (uint8 activations,
  int8 weights, int32 sums: exact) -> Cast -> Mul by s_x and the per-channel weight scales ->
  Add the folded bias, in float, then QuantizeLinear where a QuantAct follows. The QDQ form
  (DequantizeLinear -> Conv -> QuantizeLinear, which onnxruntime fuses into QLinearConv;
  `build(..., qlinear=True)`) is not the default: QLinearConv takes the bias in int32 in units of
  s_x s_w, and that rounding (up to 1 % of an output step at 4-bit activations) moves outputs
  near a rounding boundary by a step, which then spread: on the random-weight test networks at
  W4A4, QLinearConv models agreed with the student on fewer than half of the images, the
  ConvInteger form on all of them.
* **The classifier**: the mean over positions commutes with the dense layer, so each position's
  uint8 features go through MatMulInteger with the int8 classifier, the int32 results are summed
  over positions (ReduceSum), then scaled and the bias added: exact where a pooled-then-
  requantized input would not be.
* **Float**, as in the student: the convolutions whose input the student does not quantize (the
  first one on the normalized image; in MobileNetV2 also every expansion 1x1 on the residual
  stream and the final 1x1), the residual adds, the normalization. Their weights are still the
  int8 grid values behind a DequantizeLinear.

`optimized_operators(model)` runs onnxruntime's graph optimizer and counts what it made.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import tempfile
from typing import Any, Optional, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bag_jax.models.layers import BN_EPSILON

# Opset 13: per-axis QuantizeLinear/DequantizeLinear, uint8 Clip and MaxPool, ConvInteger and
# MatMulInteger; the opset onnxruntime's own quantization tool writes QDQ models in.
OPSET = 13
INPUT, OUTPUT = 'images', 'logits'
# The operators that compute a convolution or the classifier in integers after onnxruntime's
# graph optimization.
INTEGER_OPERATORS = ('QLinearConv', 'ConvInteger', 'MatMulInteger', 'QLinearMatMul')
RELU6_CAP = 6.0
# The integer operators' weights are uint8 with this one zero point for the whole tensor (the
# grid values v + 128): onnxruntime's uint8 x uint8 ConvInteger ran a 64-channel 3x3 layer 3.6x
# faster than its uint8 x int8 one (8.3 against 29.9 ms, batch 64, 8x8), and it cannot saturate
# on CPUs without VNNI, where uint8 x int8 products are summed in pairs in int16.
WEIGHT_OFFSET = 128


@dataclasses.dataclass(frozen=True)
class Quantized:
    """A quantized activation in the graph: `name`, a uint8 NCHW tensor of grid values v_a; the
    activation is v_a * `scale`."""
    name: str
    scale: np.float32


Tensor = Union[str, Quantized]     # a float32 NCHW tensor's name, or a quantized one


def activation_grid(x_min, x_max, bits: int, activation: Optional[str]) -> tuple[np.float32, int, int]:
    """The uint8 form of a QuantAct on [x_min, x_max] at `bits` that follows `activation` ('relu',
    'relu6' or None): (scale 1 / s_a, lowest and highest grid value v_a = q_a + z_a that it can
    output). `quant.quantize_to_grid` in float32, in its order of operations. ValueError if the
    values do not fit uint8 with zero point 0 (a range that starts above half a grid step)."""
    n = np.float32(2.0**bits - 1.0)
    lo, hi = np.float32(x_min), np.float32(x_max)
    s = n / np.maximum(hi - lo, np.float32(1e-8))
    first = int(np.round(s * lo))
    low, high = first, first + int(n)

    def grid_value(x):   # v_a of the float x
        return int(np.clip(np.round(s * np.float32(x)), low, high))
    if activation in ('relu', 'relu6'):
        low = max(low, grid_value(0.0))
    if activation == 'relu6':
        high = min(high, grid_value(RELU6_CAP))
    if low < 0 or high > 255:
        raise ValueError(f'an activation range [{float(lo)}, {float(hi)}] at {bits} bits has grid values {low} .. '
                         f'{high}: the ONNX export holds them in uint8 with zero point 0 (0 .. 255).')
    return np.float32(1.0 / np.float64(s)), low, high


def folded_kernel(arrays: dict[str, np.ndarray], conv: str, bn: Optional[str]):
    """The kernel `conv` of the integer form with the BatchNorm `bn` (None: none) folded in:
    (grid values v_w = q + z, int32, ONNX layout (O, I, kH, kW) or (I, O) for a dense kernel;
    per-output-channel float32 scale g / s_w; float32 bias beta - mean g, or the layer's own)."""
    q, zero_point, s = arrays[f'{conv}/q'], arrays[f'{conv}/zero_point'], arrays[f'{conv}/scale']
    values = q.astype(np.int32) + zero_point.astype(np.int32)
    if bn is None:
        gain = np.ones_like(s)
        bias = np.asarray(arrays.get(f'{conv}/bias', np.zeros_like(s)), np.float32)   # MobileNetV2's has none
    else:
        # flax.linen.BatchNorm's factor, in its order of operations (integer_inference._batch_norm).
        gain = (1.0 / np.sqrt(arrays[f'{bn}/var'] + np.float32(BN_EPSILON))).astype(np.float32) * arrays[f'{bn}/scale']
        bias = (arrays[f'{bn}/bias'] - arrays[f'{bn}/mean'] * gain).astype(np.float32)
    scale = (gain.astype(np.float64) / s.astype(np.float64)).astype(np.float32)
    if values.ndim == 4:
        values = values.transpose(3, 2, 0, 1)       # HWIO -> OIHW (depthwise: (k, k, 1, C) -> (C, 1, k, k))
    return values, scale, bias


def int8_parts(values: np.ndarray) -> list[np.ndarray]:
    """`values` (int32) as int8 arrays in -127 .. 127 that sum to it: itself where it fits, else
    as many as it takes (8-bit grid values reach -255 .. 255: two, three for +-255)."""
    parts, rest = [], values.astype(np.int64)
    while not parts or np.any(rest):
        part = np.clip(rest, -127, 127)
        parts.append(part.astype(np.int8))
        rest = rest - part
    return parts


def offset(part: np.ndarray) -> np.ndarray:
    """An int8 kernel part (-127 .. 127) as the uint8 that ConvInteger and MatMulInteger take with
    the zero point WEIGHT_OFFSET: part + 128, the same values."""
    return (part.astype(np.int16) + WEIGHT_OFFSET).astype(np.uint8)


class _Builder:
    """Collects nodes and initializers; every name is unique."""

    def __init__(self, qlinear: bool, float_baseline: bool = False):
        self.qlinear, self.float_baseline = qlinear, float_baseline
        self.nodes, self.initializers, self.count = [], [], 0
        self.integer_layers, self.float_layers = [], []

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f'{hint}#{self.count}'

    def const(self, hint: str, value) -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str, **attributes) -> str:
        out = self.fresh(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out + '/' + op, **attributes))
        return out

    # Activations -------------------------------------------------------------------------

    def quantize(self, x: str, arrays, act: str, bits: int, activation: Optional[str]) -> Quantized:
        """QuantizeLinear (uint8, zero point 0) of float x on the QuantAct `act`'s range, and the
        Clip that the grid or ReLU6 needs. In the float baseline: the ReLU or ReLU6 alone (a float name)."""
        if self.float_baseline:
            if activation == 'relu6':
                return self.node('Clip', [x, self.const('zero', np.float32(0)), self.const('six', np.float32(RELU6_CAP))],
                                 act + '/relu6')
            return self.node('Relu', [x], act + '/relu')
        scale, low, high = activation_grid(arrays[f'{act}/x_min'], arrays[f'{act}/x_max'], bits, activation)
        q = self.node('QuantizeLinear', [x, self.const(f'{act}/scale', scale), self.const(f'{act}/zero', np.uint8(0))],
                      act)
        if (low, high) != (0, 255):
            q = self.node('Clip', [q, self.const(f'{act}/low', np.uint8(low)), self.const(f'{act}/high', np.uint8(high))],
                          act + '/clip')
        return Quantized(q, scale)

    def dequantize(self, x: Quantized) -> str:
        """A DequantizeLinear of x of its own (onnxruntime's QDQ fusion wants one per consumer)."""
        return self.node('DequantizeLinear', [x.name, self.const('scale', x.scale), self.const('zero', np.uint8(0))],
                         'dequantized')

    # Layers ------------------------------------------------------------------------------

    def conv_block(self, x: Tensor, arrays, path: str, strides: int, activation: Optional[str],
                   a_bits: int, depthwise: bool = False) -> Tensor:
        """layers.ConvBlock at `path` (conv, BN folded, [ReLU/ReLU6, QuantAct]) on x; returns the
        quantized activation, or the float BN output where the block has no activation."""
        conv, bn = f'{path}/conv', f'{path}/bn'
        act = f'{path}/act_quant' if activation else None
        values, scale, bias = folded_kernel(arrays, conv, bn)
        kernel = values.shape[-1]
        groups = values.shape[0] if depthwise else 1
        attributes = dict(kernel_shape=[kernel, kernel], strides=[strides, strides], pads=[kernel // 2] * 4, group=groups)
        if not isinstance(x, Quantized):
            self.float_layers.append(conv)
            weight = (self.const(f'{conv}/w', (values * scale.reshape(-1, 1, 1, 1)).astype(np.float32))
                      if self.float_baseline else self._dequantized_weight(conv, values, scale))
            y = self.node('Conv', [x, weight, self.const(f'{conv}/bias', bias)], conv, **attributes)
        else:
            self.integer_layers.append(conv)
            parts = int8_parts(self._positive(values, scale))
            if self.qlinear and act is not None and len(parts) == 1:
                # DequantizeLinear -> Conv -> QuantizeLinear: onnxruntime's QLinearConv.
                weight = self.node('DequantizeLinear', [self.const(f'{conv}/w', parts[0]),
                                                        self.const(f'{conv}/w_scale', np.abs(scale)),
                                                        self.const(f'{conv}/w_zero', np.zeros(len(scale), np.int8))],
                                   f'{conv}/weight', axis=0)
                y = self.node('Conv', [self.dequantize(x), weight, self._int32_bias(conv, bias, x.scale * np.abs(scale))],
                              conv, **attributes)
            else:
                acc = self._integer_sum([self.node('ConvInteger', [x.name, self.const(f'{conv}/w', offset(part)),
                                                                    self.const('zero', np.uint8(0)),
                                                                    self.const('offset', np.uint8(WEIGHT_OFFSET))],
                                                   f'{conv}/acc', **attributes) for part in parts], conv)
                y = self._affine(acc, np.abs(scale) * x.scale, bias, (1, -1, 1, 1), conv)
        if act is None:
            return y
        return self.quantize(y, arrays, act, a_bits, activation)

    def classifier(self, x: Tensor, arrays, layer: str, positions: int) -> str:
        """The global mean of x (B, C, H, W) and the dense `layer`, as MatMulInteger on every
        position, the int32 sum over positions, then the scales and the bias: (B, classes)."""
        values, scale, bias = folded_kernel(arrays, layer, None)
        if values.ndim == 4:                                   # MobileNetV2's 1x1 conv classifier
            values = values[:, :, 0, 0].T                       # (O, I, 1, 1) -> (I, O)
        if not isinstance(x, Quantized):                       # the float baseline
            self.float_layers.append(layer)
            pooled = self.node('GlobalAveragePool', [x], 'pooled')
            pooled = self.node('Flatten', [pooled], 'pooled')
            y = self.node('MatMul', [pooled, self.const(f'{layer}/w', (values * scale).astype(np.float32))], layer)
            return self.node('Add', [y, self.const(f'{layer}/bias', bias)], layer)
        self.integer_layers.append(layer)
        channels = values.shape[0]
        features = self.node('Transpose', [x.name], 'features', perm=[0, 2, 3, 1])
        features = self.node('Reshape', [features, self.const('shape', np.array([0, -1, channels], np.int64))],
                             'features')
        parts = int8_parts(self._positive(values.T, scale).T)
        acc = self._integer_sum([self.node('MatMulInteger', [features, self.const(f'{layer}/w', offset(part)),
                                                              self.const('zero', np.uint8(0)),
                                                              self.const('offset', np.uint8(WEIGHT_OFFSET))],
                                           f'{layer}/acc')
                                 for part in parts], layer)
        acc = self.node('ReduceSum', [acc, self.const('axes', np.array([1], np.int64))], f'{layer}/sum', keepdims=0)
        return self._affine(acc, np.abs(scale) * x.scale / np.float32(positions), bias, (1, -1), layer)

    # Helpers -----------------------------------------------------------------------------

    @staticmethod
    def _positive(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """The kernel with each output channel (axis 0) of negative scale negated, so that every
        scale can be |scale| (a zero scale: the channel is 0 whatever its values)."""
        sign = np.where(scale < 0, -1, np.where(scale > 0, 1, 0)).astype(np.int32)
        return values * sign.reshape((-1,) + (1,) * (values.ndim - 1))

    def _dequantized_weight(self, conv: str, values, scale) -> str:
        parts = int8_parts(self._positive(values, scale))
        if len(parts) > 1:        # a float convolution anyway: the float kernel
            return self.const(f'{conv}/w', (values * scale.reshape(-1, 1, 1, 1)).astype(np.float32))
        return self.node('DequantizeLinear', [self.const(f'{conv}/w', parts[0]), self.const(f'{conv}/w_scale', np.abs(scale)),
                                              self.const(f'{conv}/w_zero', np.zeros(len(scale), np.int8))],
                         f'{conv}/weight', axis=0)

    def _int32_bias(self, conv: str, bias, unit) -> str:
        """The bias as QLinearConv takes it: int32 in units of s_x s_w per channel (`unit`), behind
        a DequantizeLinear; within half a unit of the float bias."""
        unit = np.where(unit > 0, unit, np.float32(1.0)).astype(np.float32)
        values = np.clip(np.round(bias.astype(np.float64) / unit), -2**31, 2**31 - 1).astype(np.int32)
        return self.node('DequantizeLinear', [self.const(f'{conv}/bias', values), self.const(f'{conv}/bias_scale', unit),
                                              self.const(f'{conv}/bias_zero', np.zeros(len(values), np.int32))],
                         f'{conv}/bias', axis=0)

    def _integer_sum(self, accumulators: list[str], hint: str) -> str:
        total = accumulators[0]
        for acc in accumulators[1:]:
            total = self.node('Add', [total, acc], hint + '/acc')
        return total

    def _affine(self, acc: str, scale, bias, shape, hint: str) -> str:
        """float(acc) * scale + bias, per channel (`shape` broadcasts them against acc)."""
        y = self.node('Cast', [acc], hint + '/float', to=TensorProto.FLOAT)
        y = self.node('Mul', [y, self.const(hint + '/scale', np.asarray(scale, np.float32).reshape(shape))], hint)
        return self.node('Add', [y, self.const(hint + '/bias', np.asarray(bias, np.float32).reshape(shape))], hint)


def _has(arrays, kernel: str) -> bool:
    return f'{kernel}/q' in arrays


def build(arrays: dict[str, np.ndarray], meta: dict[str, Any], qlinear: bool = False,
          float_baseline: bool = False) -> onnx.ModelProto:
    """The ONNX model of the student whose integer form is `arrays` and checkpoint metadata
    `meta` (module docstring): input 'images' uint8 (batch, H, W, C), output 'logits' float32
    (batch, classes). `qlinear`: the conv-BN-ReLU-QuantAct blocks on quantized inputs in QDQ form
    (onnxruntime's QLinearConv, an int32 bias: not exact), the others as they are.
    `float_baseline`: no activation quantization and float32 kernels (the dequantized ones, BN
    folded), float convolutions throughout: the float network of the same shapes, for timing
    against (bench/onnx_latency.py). It records which layers compute in integers as metadata
    ('integer_layers', 'float_layers': comma-separated kernel names)."""
    from bag_jax import integer_inference
    _, a_bits = integer_inference.check_student(meta, 'the student')
    height, width, channels = (int(d) for d in meta['data']['image_shape'])
    mean, std = np.asarray(meta['data']['mean'], np.float32), np.asarray(meta['data']['std'], np.float32)
    g = _Builder(qlinear, float_baseline)
    x = g.node('Cast', [INPUT], 'pixels', to=TensorProto.FLOAT)
    # data.normalize's order of operations: x / 255 - mean, then / std.
    x = g.node('Div', [x, g.const('255', np.float32(255.0))], 'pixels')
    x = g.node('Div', [g.node('Sub', [x, g.const('mean', mean)], 'normalized'), g.const('std', std)], 'normalized')
    x = g.node('Transpose', [x], 'nchw', perm=[0, 3, 1, 2])
    arch = meta['arch']
    if arch == 'resnet_cifar':
        x = g.conv_block(x, arrays, 'init_block', 1, 'relu', a_bits)
        x = _resnet_units(g, x, arrays, a_bits, bottleneck=False)
        halvings = 2                                  # stages 2 and 3
    elif arch == 'resnet':
        x = g.conv_block(x, arrays, 'init_block/conv', 2, 'relu', a_bits)
        # The max pool of grid values is a grid value: uint8 MaxPool (padding never wins).
        pool = dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
        x = (Quantized(g.node('MaxPool', [x.name], 'init_block/pool', **pool), x.scale) if isinstance(x, Quantized)
             else g.node('MaxPool', [x], 'init_block/pool', **pool))
        x = _resnet_units(g, x, arrays, a_bits, bottleneck=bool(meta.get('bottleneck')))
        halvings = 2 + len(meta['channels']) - 1      # the stem conv, the max pool, stages 2..
    elif arch == 'mobilenetv2':
        x = g.conv_block(x, arrays, 'init_block', 2, 'relu6', a_bits)
        for stage, unit in _units(arrays):
            name = f'stage{stage}_unit{unit}'
            strides = 2 if (unit == 1 and stage > 1) else 1
            b = g.conv_block(x, arrays, f'{name}/conv1', 1, 'relu6', a_bits)
            b = g.conv_block(b, arrays, f'{name}/conv2', strides, 'relu6', a_bits, depthwise=True)
            b = g.conv_block(b, arrays, f'{name}/conv3', 1, None, a_bits)
            in_features, features = arrays[f'{name}/conv1/conv/q'].shape[2], arrays[f'{name}/conv3/conv/q'].shape[3]
            if in_features == features and strides == 1:
                x = g.node('Add', [b, g.dequantize(x) if isinstance(x, Quantized) else x], f'{name}/residual')
            else:
                x = b
        x = g.conv_block(x, arrays, 'final_block', 1, 'relu6', a_bits)
        halvings = 1 + len(meta['channels']) - 1      # the stem, stages 2..
    else:
        raise ValueError(f'arch={arch!r}: the ONNX export knows resnet_cifar, resnet and mobilenetv2.')
    # Every stride-2 layer here (kernel k, padding k // 2; the max pool 3, padding 1) maps n to ceil(n / 2).
    rows, columns = height, width
    for _ in range(halvings):
        rows, columns = -(-rows // 2), -(-columns // 2)
    logits = g.classifier(x, arrays, 'output', rows * columns)
    g.nodes.append(helper.make_node('Identity', [logits], [OUTPUT], name='logits'))
    graph = helper.make_graph(
        g.nodes, f'bag_jax_{arch}_w{meta["quant"]["w_bits"]}a{a_bits}',
        [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ['batch', height, width, channels])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ['batch', int(meta['num_classes'])])],
        g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', OPSET)], producer_name='bag_jax')
    model.ir_version = 8            # onnxruntime >= 1.14 reads it
    helper.set_model_props(model, {'integer_layers': ','.join(g.integer_layers),
                                   'float_layers': ','.join(g.float_layers)})
    return model


def _units(arrays) -> list[tuple[int, int]]:
    """(stage, unit) of every residual unit in the integer form, in network order."""
    units = {tuple(int(p) for p in name.split('/')[0][len('stage'):].split('_unit'))
             for name in arrays if name.startswith('stage')}
    return sorted(units)


def _resnet_units(g: _Builder, x: Tensor, arrays, a_bits: int, bottleneck: bool) -> Tensor:
    """resnet_imagenet.ResUnit for every unit: y = QuantAct(ReLU(branch + identity))."""
    for stage, unit in _units(arrays):
        name = f'stage{stage}_unit{unit}'
        strides = 2 if (unit == 1 and stage > 1) else 1
        if bottleneck:
            b = g.conv_block(x, arrays, f'{name}/conv1', strides, 'relu', a_bits)
            b = g.conv_block(b, arrays, f'{name}/conv2', 1, 'relu', a_bits)
            branch = g.conv_block(b, arrays, f'{name}/conv3', 1, None, a_bits)
        else:
            b = g.conv_block(x, arrays, f'{name}/conv1', strides, 'relu', a_bits)
            branch = g.conv_block(b, arrays, f'{name}/conv2', 1, None, a_bits)
        if _has(arrays, f'{name}/identity_conv/conv'):
            identity = g.conv_block(x, arrays, f'{name}/identity_conv', strides, None, a_bits)
        else:
            identity = g.dequantize(x) if isinstance(x, Quantized) else x
        x = g.quantize(g.node('Add', [branch, identity], f'{name}/add'), arrays, f'{name}/act_quant', a_bits, 'relu')
    return x


def layer_lists(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(the kernels computed in integers, those computed in float) as `build` recorded them."""
    props = {p.key: p.value for p in model.metadata_props}
    return ([n for n in props.get('integer_layers', '').split(',') if n],
            [n for n in props.get('float_layers', '').split(',') if n])


def session(model: Union[bytes, str], threads: Optional[int] = None, optimized_path: Optional[str] = None):
    """An onnxruntime CPU session of `model` (bytes or a path), every graph optimization on
    (ORT_ENABLE_ALL); `optimized_path`: where to write the optimized graph."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3            # its warning that an optimized graph is machine-specific
    if threads:
        options.intra_op_num_threads = threads
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return onnxruntime.InferenceSession(model, options, providers=['CPUExecutionProvider'])


def optimized_operators(model: Union[bytes, str]) -> dict[str, int]:
    """How many nodes of each operator type onnxruntime runs after its graph optimization
    (ORT_ENABLE_ALL), read back from the optimized graph it writes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'optimized.onnx')
        session(model, optimized_path=path)
        optimized = onnx.load(path)
    return dict(collections.Counter(node.op_type for node in optimized.graph.node))

"""Integer inference of a quantized student: the fake-quantized network's arithmetic, with
integer weights and activations.

What is integer, what stays float, and where rounding happens (a `ResNetCifar` student at
w_bits, a_bits <= 8):

* **Weights.** Every conv and dense kernel is held as q_w, its index on its output channel's
  k-bit grid (-2^(k-1) .. 2^(k-1)-1, an int8), with an integer zero point z_w and a float32
  scale s_w per output channel: the student's fake-quantized weight is exactly (q_w + z_w) / s_w
  (`quant.quantize_to_grid`, the function the fake quantizer itself uses).
* **Activations.** Every QuantAct output (after each ReLU) is carried as q_a (int8) with its
  layer's integer zero point z_a and float32 scale s_a: the fake-quantized activation is
  (q_a + z_a) / s_a.
* **A conv on quantized activations** accumulates A W = (q_a + z_a)(q_w + z_w) over the window
  and the input channels, padding counting as 0, exactly, from int8 operands with int32
  accumulation (`lax.conv_general_dilated(..., preferred_element_type=int32)`):
      conv(q_a, q_w) + z_w conv(q_a, 1) + z_a (conv(P, q_w) + z_w conv(P, 1)),
  P being ones on the image and zeros in the padding. One float multiply by 1 / (s_a s_w) then
  gives the fake-quantized conv's output up to float rounding (it sums the same products of
  dequantized floats).
* **Float**: BatchNorm with the running statistics (as the student uses them), ReLU, the
  residual add (its identity input dequantized), the dense bias, the first conv (its input is
  the normalized image, which the student does not quantize: float input, dequantized integer
  weights), and the requantization of every activation, by `quant.quantize_to_grid` on the
  float result with the layer's calibrated range. That requantization is where rounding
  happens, as in the fake-quantized network; a float difference in its input (a different
  summation order) can move a value that sits on a rounding boundary by one step.
* **Pooling and the classifier**: sum over positions of (q_a + z_a) in int32, an int32 dot with
  (q_w + z_w), then divided by s_a s_w times the number of positions, plus the bias.

Other architectures (ResNet-18/50, MobileNetV2) have the same integer form (every kernel's q,
zero point and scale), and `make_forward` runs them in float32 on the dequantized kernels
(`dequantized_forward`): the student's own numbers, its storage saved, not its arithmetic. So
does every architecture on GPUs and TPUs (`make_forward`).

`integer_form(model, variables)` computes that representation from a student's variables;
`make_forward(arrays, meta)` returns `forward(uint8 images (B, H, W, C)) -> logits (B, classes)`,
a pure jnp function (normalization inside) that `bag_jax.export` serializes with `jax.export`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from bag_jax import data, models, quant
from bag_jax.models.layers import BN_EPSILON
from bag_jax.models.resnet_cifar import units_per_stage

MAX_BITS = 8          # int8 containers
_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


@dataclasses.dataclass(frozen=True)
class Activation:
    """A quantized activation: value (q + zero_point) / scale, q int8, zero_point int32 ()."""
    q: jax.Array
    zero_point: jax.Array
    scale: jax.Array

    def dequantized(self) -> jax.Array:
        # The fake quantizer's own expression, in float32 (quant._quantize_dequantize).
        return (self.q.astype(jnp.float32) + self.zero_point.astype(jnp.float32)) / self.scale

    def integers(self) -> jax.Array:
        """q + zero_point in int32: the activation times its scale."""
        return self.q.astype(jnp.int32) + self.zero_point


def check_student(meta: dict[str, Any], what: str) -> tuple[int, int]:
    """(w_bits, a_bits) of a student checkpoint's metadata; ValueError naming `what` unless it is
    a quantized student with both bit-widths in 1..MAX_BITS."""
    bits = meta.get('quant', {}) if meta.get('kind') == 'student' else {}
    w_bits, a_bits = bits.get('w_bits'), bits.get('a_bits')
    if w_bits is None or a_bits is None:
        kind = 'a full-precision teacher' if meta.get('kind') != 'student' else f'a W{w_bits}A{a_bits} student'
        raise ValueError(f'{what} is {kind}: integer inference needs a student quantized in both weights and '
                         f'activations (quant.w_bits and quant.a_bits from 1 to {MAX_BITS}).')
    if w_bits > MAX_BITS or a_bits > MAX_BITS:
        raise ValueError(f'{what} is a W{w_bits}A{a_bits} student: integer inference holds weights and activations '
                         f'in int8, so both bit-widths must be at most {MAX_BITS}.')
    return int(w_bits), int(a_bits)


def integer_form(model, variables) -> dict[str, np.ndarray]:
    """The integer representation of a student, as numpy arrays by name:

      <layer>/q           int8, the kernel's grid indices (HWIO or (in, out))
      <layer>/zero_point  int32 (out,)        <layer>/scale  float32 (out,)
      <act>/x_min, <act>/x_max                float32 (): each QuantAct's calibrated range
      <bn>/mean, var, scale, bias             float32: BatchNorm, running statistics
      output/bias                             float32: the classifier's bias

    Layer names are the Flax module paths ('stage1_unit1/conv1/conv', 'output').
    """
    params = flax.traverse_util.flatten_dict(jax.device_get(variables['params']), sep='/')
    stats = flax.traverse_util.flatten_dict(jax.device_get(variables['batch_stats']), sep='/')
    ranges = flax.traverse_util.flatten_dict(jax.device_get(variables['quant_stats']), sep='/')
    out = {}
    for name, value in params.items():
        layer, leaf = name.rsplit('/', 1)
        if leaf == 'kernel':
            w = jnp.asarray(value)
            q, zero_point, scale = quant.quantize_to_grid(w, *quant.weight_range(w), model.quant.w_bits)
            out[f'{layer}/q'] = np.asarray(q, np.int8)
            out[f'{layer}/zero_point'] = np.asarray(zero_point, np.float32).reshape(-1).astype(np.int32)
            out[f'{layer}/scale'] = np.asarray(scale, np.float32).reshape(-1)
        else:                                   # BN scale and bias, the dense bias
            out[name] = np.asarray(value, np.float32)
    out.update({name: np.asarray(value, np.float32) for name, value in stats.items()})
    out.update({name: np.asarray(value, np.float32) for name, value in ranges.items()
                if name.endswith(('/x_min', '/x_max'))})
    return out


def _dequantized_kernel(arrays, layer: str) -> jax.Array:
    zero_point = arrays[f'{layer}/zero_point'].astype(jnp.float32)
    return (arrays[f'{layer}/q'].astype(jnp.float32) + zero_point) / arrays[f'{layer}/scale']


def _conv(x, kernel, strides: int, pad: int):
    integer = jnp.issubdtype(x.dtype, jnp.integer)
    return jax.lax.conv_general_dilated(x, kernel, (strides, strides), ((pad, pad), (pad, pad)),
                                        dimension_numbers=_DIMENSIONS,
                                        preferred_element_type=jnp.int32 if integer else None)


def _integer_conv(a: Activation, arrays, layer: str, strides: int) -> jax.Array:
    """The fake-quantized conv of a quantized activation, from int8 operands (module docstring)."""
    q_w, z_w = arrays[f'{layer}/q'], arrays[f'{layer}/zero_point']
    pad = q_w.shape[0] // 2
    ones_kernel = jnp.ones(q_w.shape[:3] + (1,), jnp.int8)
    image = jnp.ones((1,) + a.q.shape[1:], jnp.int8)     # P: the padding is added by the conv
    acc = (_conv(a.q, q_w, strides, pad) + z_w * _conv(a.q, ones_kernel, strides, pad)
           + a.zero_point * (_conv(image, q_w, strides, pad) + z_w * _conv(image, ones_kernel, strides, pad)))
    return acc.astype(jnp.float32) * (1.0 / (a.scale * arrays[f'{layer}/scale']))


def _batch_norm(arrays, path: str, x) -> jax.Array:
    # flax.linen.BatchNorm with running statistics, in its order of operations.
    mul = jax.lax.rsqrt(arrays[f'{path}/var'] + BN_EPSILON) * arrays[f'{path}/scale']
    return (x - arrays[f'{path}/mean']) * mul + arrays[f'{path}/bias']


def _quantize(arrays, path: str, x, bits: int) -> Activation:
    q, zero_point, scale = quant.quantize_to_grid(x, arrays[f'{path}/x_min'], arrays[f'{path}/x_max'], bits)
    return Activation(q.astype(jnp.int8), zero_point.astype(jnp.int32), scale)


INTEGER_ARCHITECTURES = ('resnet_cifar',)   # those with integer kernels; the others: `dequantized_forward`


def make_forward(arrays: dict[str, Any], meta: dict[str, Any]) -> Callable[[jax.Array], jax.Array]:
    """forward(images uint8 (B, H, W, C)) -> float32 logits (B, classes) of the student that
    `integer_form` gave `arrays` for; `meta` is its checkpoint metadata (architecture, bit-widths,
    input normalization). Pure jnp: jit it, or export it.

    On CPUs, integer arithmetic for INTEGER_ARCHITECTURES (`integer_forward`); on every other
    platform, and for the other architectures, the dequantized form (`dequantized_forward`). XLA
    on GPUs gives integer convolutions to cuDNN, which has int8 convolutions with an int8 or a
    float32 output but none accumulating in int32 as `integer_forward` asks (an H100 refused the
    integer program); a program exported for several platforms holds both forms and the platform
    that runs it picks its own (`jax.lax.platform_dependent`)."""
    if meta['arch'] not in INTEGER_ARCHITECTURES:
        return dequantized_forward(arrays, meta)
    integer, dequantized = integer_forward(arrays, meta), dequantized_forward(arrays, meta)

    def forward(images: jax.Array) -> jax.Array:
        return jax.lax.platform_dependent(images, cpu=integer, default=dequantized)
    return forward


def dequantized_forward(arrays: dict[str, Any], meta: dict[str, Any]) -> Callable[[jax.Array], jax.Array]:
    """The student of any architecture from its integer form, in float32: each kernel is its
    dequantized integer form (q + z_w) / s_w, which is exactly the fake-quantized kernel, and the
    activations are fake-quantized on their calibrated ranges, as the student computes them. Its
    logits are the student's up to float rounding; what it saves is the kernels' storage (packed
    at w_bits), not arithmetic. The ImageNet architectures take this path: their integer kernels
    (max pooling on integers, depthwise and bottleneck convolutions) are not written yet."""
    w_bits, a_bits = check_student(meta, 'the student')
    spec = dataclasses.replace(quant.QuantSpec(**meta.get('quant', {})), w_bits=None)   # kernels dequantized
    model = models.build(meta, spec)
    kernels = {name[:-len('/q')] for name in arrays if name.endswith('/q')}
    params, stats, ranges = {}, {}, {}
    for name, value in arrays.items():
        layer, leaf = name.rsplit('/', 1)
        if layer in kernels and leaf in ('q', 'zero_point', 'scale'):
            if leaf == 'q':
                params[(*layer.split('/'), 'kernel')] = _dequantized_kernel(arrays, layer)
        elif leaf in ('mean', 'var'):
            stats[tuple(name.split('/'))] = jnp.asarray(value)
        elif leaf in ('x_min', 'x_max'):
            ranges[tuple(name.split('/'))] = jnp.asarray(value)
            ranges[(*layer.split('/'), 'beta_t')] = jnp.ones((), jnp.float32)   # unused when frozen
        else:
            params[tuple(name.split('/'))] = jnp.asarray(value)
    unflatten = flax.traverse_util.unflatten_dict
    variables = {'params': unflatten(params), 'batch_stats': unflatten(stats), 'quant_stats': unflatten(ranges)}
    info = data.DatasetInfo.from_dict(meta['data'])

    def forward(images: jax.Array) -> jax.Array:
        return model.apply(variables, data.normalize(images, info))
    return forward


def integer_forward(arrays: dict[str, Any], meta: dict[str, Any]) -> Callable[[jax.Array], jax.Array]:
    """The integer inference of a resnet_cifar student (module docstring)."""
    _, a_bits = check_student(meta, 'the student')      # the weights' grid is already in their q
    depth = int(meta['depth'])
    n = units_per_stage(depth)
    info = data.DatasetInfo.from_dict(meta['data'])
    arrays = {k: jnp.asarray(v) for k, v in arrays.items()}

    def forward(images: jax.Array) -> jax.Array:
        x = data.normalize(images, info)
        x = _conv(x, _dequantized_kernel(arrays, 'init_block/conv'), 1, 1)
        x = jax.nn.relu(_batch_norm(arrays, 'init_block/bn', x))
        a = _quantize(arrays, 'init_block/act_quant', x, a_bits)
        for stage in (1, 2, 3):
            for unit in range(1, n + 1):
                name = f'stage{stage}_unit{unit}'
                strides = 2 if (unit == 1 and stage > 1) else 1
                b = jax.nn.relu(_batch_norm(arrays, f'{name}/conv1/bn', _integer_conv(a, arrays, f'{name}/conv1/conv', strides)))
                b = _quantize(arrays, f'{name}/conv1/act_quant', b, a_bits)
                branch = _batch_norm(arrays, f'{name}/conv2/bn', _integer_conv(b, arrays, f'{name}/conv2/conv', 1))
                if f'{name}/identity_conv/conv/q' in arrays:
                    identity = _batch_norm(arrays, f'{name}/identity_conv/bn',
                                           _integer_conv(a, arrays, f'{name}/identity_conv/conv', strides))
                else:
                    identity = a.dequantized()
                a = _quantize(arrays, f'{name}/act_quant', jax.nn.relu(branch + identity), a_bits)
        positions = math.prod(a.q.shape[1:3])
        pooled = jnp.sum(a.integers(), axis=(1, 2))                         # int32 (B, C)
        kernel = arrays['output/q'].astype(jnp.int32) + arrays['output/zero_point']
        acc = jax.lax.dot_general(pooled, kernel, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
        return acc.astype(jnp.float32) / (a.scale * arrays['output/scale'] * positions) + arrays['output/bias']
    return forward

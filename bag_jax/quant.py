"""The reference fake quantizer and the layers built on it.

One quantize-dequantize function serves every quantized tensor in the project: student weights,
student activations, and the BAG generator's weights and (optionally) activations. It follows the
GDFQ/AdaDFQ code (docs/algorithms.md 2.2): an asymmetric k-bit grid with an integral zero point and
round-half-even, as a `jax.custom_vjp` whose backward is the straight-through estimator.

Following AQT's split, the range is computed outside the quantizer under `stop_gradient`:
per output channel from the current weight (docs/algorithms.md 2.3), per tensor from a calibrated running range
for activations (docs/algorithms.md 2.4).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

FULL_PRECISION = 32
MAX_BITS = 16
STE_MODES = ('identity', 'clipped')
RANGE_RULES = ('reference', 'ema')
# QuantAct's running-range factor, hard-coded in the reference (docs/algorithms.md 2.4).
RANGE_MOMENTUM = 0.9
# SynQ's QuantActMSE shrinks the range by the factors 1 - 0.01 i (quant_modules.py:180-182).
LP_CLIP_STEP = 0.01


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How a network is fake-quantized: its weights at `w_bits` (per output channel), its
    activations at `a_bits` (per tensor, calibrated ranges), None for full precision; the range
    update rule and the straight-through estimator. Networks take one `quant: QuantSpec | None`
    field (None: the full-precision network); checkpoints record `dataclasses.asdict(spec)`."""
    w_bits: Optional[int] = None
    a_bits: Optional[int] = None
    range_rule: str = 'reference'
    ste: str = 'identity'


def check_bits(bits: Any, field: str) -> Optional[int]:
    """Validates a bit-width read from a config.

    Returns the bit-width as a Python int, or None for full precision (32 or None).
    Raises ValueError naming `field` for anything else.
    """
    if bits is None or (isinstance(bits, int) and not isinstance(bits, bool) and bits == FULL_PRECISION):
        return None
    if isinstance(bits, int) and not isinstance(bits, bool) and 1 <= bits <= MAX_BITS:
        return bits
    raise ValueError(
        f'{field}={bits!r} is not a valid bit-width: use an integer from 1 to {MAX_BITS}, '
        f'or {FULL_PRECISION} (or None) for full precision.')


def check_choice(value: Any, allowed: tuple[str, ...], field: str) -> str:
    """Returns `value` if it is one of `allowed`, else raises ValueError naming `field`."""
    if value not in allowed:
        raise ValueError(f'{field}={value!r} is not allowed: choose one of {", ".join(map(repr, allowed))}.')
    return value


def quantize_to_grid(x, lo, hi, bits: int):
    """x's place on the asymmetric k-bit grid of [lo, hi] (docs/algorithms.md 2.2). Returns (q, zero_point,
    scale), all float arrays broadcast from x, lo and hi: q is an integer in
    [-2^(k-1), 2^(k-1) - 1], zero_point an integer, and the quantized value is
    (q + zero_point) / scale. `fake_quant` and the integer inference share this function, so both
    round exactly alike.
    """
    # The reference's AsymmetricQuantFunction.forward, in its order of operations.
    n = 2.0**bits - 1.0
    scale = n / jnp.maximum(hi - lo, 1e-8)
    zero_point = jnp.round(scale * lo) + 2.0**(bits - 1)
    half = 2.0**(bits - 1)
    q = jnp.clip(jnp.round(scale * x - zero_point), -half, half - 1.0)
    return q, zero_point, scale


def _quantize_dequantize(x, lo, hi, bits):
    q, zero_point, scale = quantize_to_grid(x, lo, hi, bits)
    return (q + zero_point) / scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fake_quant(x, lo, hi, bits, ste):
    return _quantize_dequantize(x, lo, hi, bits)


def _fake_quant_fwd(x, lo, hi, bits, ste):
    residuals = (x, lo, hi) if ste == 'clipped' else None
    return _quantize_dequantize(x, lo, hi, bits), residuals


def _fake_quant_bwd(bits, ste, residuals, g):
    # No gradient reaches the range: the reference returns None for min and max.
    if ste == 'clipped':
        x, lo, hi = residuals
        g = jnp.where((x >= lo) & (x <= hi), g, jnp.zeros_like(g))
        return g, jnp.zeros_like(lo), jnp.zeros_like(hi)
    return g, None, None


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(x: jax.Array, lo: jax.Array, hi: jax.Array, bits: int, ste: str = 'identity') -> jax.Array:
    """Asymmetric k-bit quantize-dequantize of `x` on the range [lo, hi] (docs/algorithms.md 2.2).

    `lo` and `hi` broadcast against `x` (scalars for per-tensor, keepdims shapes for per-channel).
    The grid has 2^bits levels of step 1/s, s = (2^bits - 1) / max(hi - lo, 1e-8), starting at
    round(s*lo)/s; values outside are clamped to the end levels, ties round to even.

    Backward: `ste='identity'` (the reference) passes the gradient through unchanged everywhere;
    `ste='clipped'` zeroes it where x lies outside [lo, hi]. No gradient flows to lo or hi.
    Returns an array of x's shape and dtype.
    """
    check_choice(ste, STE_MODES, 'quant.ste')
    lo = jnp.asarray(lo, x.dtype)
    hi = jnp.asarray(hi, x.dtype)
    return _fake_quant(x, lo, hi, int(bits), ste)


def lp_clip_range(samples: jax.Array, bits: int, p: float = 2.4,
                  num_candidates: int = 80) -> tuple[jax.Array, jax.Array]:
    """The per-tensor activation range that minimizes the L_p quantization error: SynQ's unused
    QuantActMSE search (SynQ src/quantization_utils/quant_modules.py:159-195; the error is
    lp_loss(reduction='all') and the quantizer find_mse_smallest, quant_utils.py:29-63).

    With m, M the min and max of `samples` (any shape, one tensor), candidate i in
    0..num_candidates-1 is the range [m f_i, M f_i], f_i = 1 - 0.01 i (80 factors: 1.00 down to
    0.21; both ends scale towards 0, so a range [0, M] after a ReLU only lowers M). Each
    candidate's error is mean |x - fq(x)|^p over the samples, fq the asymmetric `bits`-bit
    quantize-dequantize of this module (the same formula as SynQ's); the first smallest wins
    (SynQ's strict `<`), so ties keep the wider range. Returns (lo, hi), scalars of the samples'
    dtype, under stop_gradient.

    Choices: this is SynQ's search for one batch only, static. SynQ runs it on every calibration
    batch and folds each batch's best range into a plain 0.9 EMA started at 0, without the bias
    correction of its QuantAct (:193-195); how samples are gathered is left to the caller. SynQ
    starts best_score at 1e10 and fails if no candidate beats it; here one always wins.
    """
    bits = check_bits(bits, 'bits')
    if bits is None:
        raise ValueError('lp_clip_range: bits=32 (full precision) has no range to search.')
    if not (isinstance(num_candidates, int) and 1 <= num_candidates <= round(1 / LP_CLIP_STEP)):
        raise ValueError(f'num_candidates={num_candidates!r}: use an integer from 1 to {round(1 / LP_CLIP_STEP)} '
                         f'(the factors 1 - {LP_CLIP_STEP} i must stay positive).')
    if not p > 0:
        raise ValueError(f'p={p!r}: the L_p exponent must be positive.')
    x = jax.lax.stop_gradient(jnp.ravel(samples))
    x_min, x_max = jnp.min(x), jnp.max(x)
    # SynQ multiplies a float32 tensor by the Python float 1.0 - i * 0.01.
    factors = jnp.asarray([1.0 - i * LP_CLIP_STEP for i in range(num_candidates)], x.dtype)

    def error(factor):
        return jnp.mean(jnp.abs(x - _quantize_dequantize(x, x_min * factor, x_max * factor, bits)) ** p)

    # One candidate at a time: the samples may be a whole layer's activations.
    best = factors[jnp.argmin(jax.lax.map(error, factors))]
    return x_min * best, x_max * best


def weight_range(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The per-output-channel range of a weight (docs/algorithms.md 2.3): min and max over every axis but the
    last (Flax's HWIO conv kernels, (in, out) dense kernels), keepdims, under stop_gradient."""
    axes = tuple(range(w.ndim - 1))
    return (jax.lax.stop_gradient(jnp.min(w, axis=axes, keepdims=True)),
            jax.lax.stop_gradient(jnp.max(w, axis=axes, keepdims=True)))


def quantize_weight(w: jax.Array, bits: Optional[int], ste: str = 'identity') -> jax.Array:
    """Per-output-channel weight fake quantization (docs/algorithms.md 2.3) on `weight_range(w)`, recomputed
    from the current weight on every call. bits=None returns `w` unchanged. Returns an array of
    w's shape.
    """
    if bits is None:
        return w
    return fake_quant(w, *weight_range(w), bits, ste)


def quantized_conv(w_bits: Optional[int], ste: str = 'identity', conv=jax.lax.conv_general_dilated):
    """A drop-in for `lax.conv_general_dilated` (or `conv`, which takes its arguments) that
    fake-quantizes the kernel (the rhs) first.

    Passed to `nn.Conv(conv_general_dilated=...)` so quantized and full-precision convolutions
    share parameter names and layouts, and teacher weights copy to the student as they are.
    """
    def quantized(lhs, rhs, *args, **kwargs):
        return conv(lhs, quantize_weight(rhs, w_bits, ste), *args, **kwargs)
    return quantized


def quantized_dot_general(w_bits: Optional[int], ste: str = 'identity'):
    """A drop-in for `lax.dot_general` that fake-quantizes the kernel (the rhs) first (nn.Dense)."""
    def dot_general(lhs, rhs, *args, **kwargs):
        return jax.lax.dot_general(lhs, quantize_weight(rhs, w_bits, ste), *args, **kwargs)
    return dot_general


def update_range(x_min, x_max, beta_t, batch_min, batch_max, rule: str = 'reference'):
    """One step of the activation range update. Returns (x_min, x_max, beta_t).

    'reference' is QuantAct's formula exactly (docs/algorithms.md 2.4), bias-correction quirk included:
        beta_t <- beta_t * 0.9;  r <- (r * 0.9 + batch_r * 0.1) / (1 - beta_t)
    'ema' is a plain 0.9 EMA seeded with the first batch (beta_t == 1 marks "no update yet").
    """
    beta = RANGE_MOMENTUM
    if rule == 'reference':
        beta_t = beta_t * beta
        x_min = (x_min * beta + batch_min * (1 - beta)) / (1 - beta_t)
        x_max = (x_max * beta + batch_max * (1 - beta)) / (1 - beta_t)
        return x_min, x_max, beta_t
    first = beta_t == 1.0
    x_min = jnp.where(first, batch_min, x_min * beta + batch_min * (1 - beta))
    x_max = jnp.where(first, batch_max, x_max * beta + batch_max * (1 - beta))
    return x_min, x_max, beta_t * beta


class QuantAct(nn.Module):
    """Per-tensor activation fake quantizer with a calibrated range (the reference's QuantAct).

    The range lives in the 'quant_stats' collection (x_min, x_max, beta_t; init 0, 0, 1). With
    `calibrate` true (a Python bool or a traced scalar) and 'quant_stats' mutable, each call
    first updates the range from this batch's min/max (`update_range`), then quantizes with it,
    as the reference does while `running_stat` is on; otherwise the stored range is used
    unchanged (frozen).
    """
    bits: Optional[int]
    range_rule: str = 'reference'
    ste: str = 'identity'

    @classmethod
    def of(cls, spec: QuantSpec, name: str) -> 'QuantAct':
        """The activation quantizer of `spec` (a_bits, range rule, STE)."""
        return cls(spec.a_bits, spec.range_rule, spec.ste, name=name)

    @nn.compact
    def __call__(self, x: jax.Array, calibrate: bool = False) -> jax.Array:
        if self.bits is None:
            return x
        x_min = self.variable('quant_stats', 'x_min', lambda: jnp.zeros((), jnp.float32))
        x_max = self.variable('quant_stats', 'x_max', lambda: jnp.zeros((), jnp.float32))
        beta_t = self.variable('quant_stats', 'beta_t', lambda: jnp.ones((), jnp.float32))
        if calibrate is not False and not self.is_initializing():
            if not self.is_mutable_collection('quant_stats'):
                raise ValueError("calibrate=True updates activation ranges: apply with mutable=['quant_stats'].")
            batch = jax.lax.stop_gradient(x)
            old = (x_min.value, x_max.value, beta_t.value)
            new = update_range(*old, jnp.min(batch), jnp.max(batch), self.range_rule)
            # `calibrate` is a Python bool in training (each phase has its own program) and may be
            # a traced one: jnp.where serves both.
            x_min.value, x_max.value, beta_t.value = (jnp.where(calibrate, n, o) for n, o in zip(new, old))
        # The input, where the caller makes 'act_inputs' mutable: the samples of the L_p range
        # search at the end of calibration (bag_jax.step.lp_clipped_ranges).
        if self.is_mutable_collection('act_inputs') and not self.is_initializing():
            self.sow('act_inputs', 'x', x, reduce_fn=lambda _, new: new, init_fn=lambda: None)
        lo = jax.lax.stop_gradient(x_min.value)
        hi = jax.lax.stop_gradient(x_max.value)
        return fake_quant(x, lo, hi, self.bits, self.ste)

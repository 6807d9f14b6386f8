"""The fake quantizer against hand-computed grids and an independent numpy version of the
reference formula; the STE; the activation range update sequence of docs/algorithms.md 2.4."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bag_jax import quant
from tests.quant_reference import numpy_reference


def test_three_bit_grid_by_hand():
    # s = 7 / 2 = 3.5, zero point round(-3.5) + 4 = 0 (half to even), q = clip(round(3.5 x), -4, 3).
    x = jnp.array([-2.0, -1.0, -0.3, 0.0, 0.26, 0.9, 1.0, 3.0])
    expected = np.array([-4, -4, -1, 0, 1, 3, 3, 3]) / 3.5
    np.testing.assert_allclose(quant.fake_quant(x, -1.0, 1.0, 3), expected, rtol=1e-6)


def test_four_bit_grid_with_ties_rounds_half_to_even():
    # lo=0, hi=7.5: s = 2, zero point 8; 2x - 8 hits .5 ties at x = 0.25, 0.75, 1.25, 7.25.
    x = jnp.array([0.0, 0.25, 0.75, 1.25, 7.25, 7.5, 9.0, -1.0])
    q = np.array([-8, -8, -6, -6, 6, 7, 7, -8])          # round(-7.5) = -8, round(-6.5) = -6, ...
    np.testing.assert_allclose(quant.fake_quant(x, 0.0, 7.5, 4), (q + 8) / 2.0, rtol=1e-6)


def test_integral_zero_point_shifts_the_grid():
    # lo=-0.3, hi=0.7, 3 bits: s = 7, zero point round(-2.1) + 4 = 2, levels (q + 2) / 7 for q in -4..3.
    levels = np.unique(np.asarray(quant.fake_quant(jnp.linspace(-1, 1, 2001), -0.3, 0.7, 3)))
    np.testing.assert_allclose(levels, np.arange(-2, 6) / 7.0, rtol=1e-6)


def test_zero_width_range_maps_everything_to_it():
    x = jnp.array([-3.0, 0.4, 0.5, 0.6, 9.0])
    out = quant.fake_quant(x, 0.5, 0.5, 3)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, 0.5, rtol=1e-6)


@pytest.mark.parametrize('bits', [1, 2, 3, 4, 5, 8])
def test_matches_numpy_reference_and_level_count(bits):
    x = np.random.default_rng(bits).normal(size=4000).astype(np.float32) * 2
    out = np.asarray(quant.fake_quant(jnp.asarray(x), -1.3, 2.1, bits))
    np.testing.assert_allclose(out, numpy_reference(x, -1.3, 2.1, bits), rtol=1e-6, atol=1e-7)
    assert len(np.unique(out)) == 2**bits


def test_per_channel_weight_quantization():
    w = np.random.default_rng(0).normal(size=(3, 3, 5, 4)).astype(np.float32)
    w[..., 2] *= 10.0                                    # channels with very different ranges
    out = np.asarray(quant.quantize_weight(jnp.asarray(w), 3))
    for c in range(4):
        expected = numpy_reference(w[..., c], w[..., c].min(), w[..., c].max(), 3)
        np.testing.assert_allclose(out[..., c], expected, rtol=1e-6, atol=1e-7)
        assert len(np.unique(out[..., c])) <= 8
    dense = np.random.default_rng(1).normal(size=(7, 6)).astype(np.float32)   # (in, out)
    out = np.asarray(quant.quantize_weight(jnp.asarray(dense), 4))
    for c in range(6):
        np.testing.assert_allclose(out[:, c], numpy_reference(dense[:, c], dense[:, c].min(), dense[:, c].max(), 4),
                                   rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(quant.quantize_weight(jnp.asarray(dense), None), dense)


def test_ste_gradient_is_identity_without_clip_mask():
    x = jnp.array([-2.0, -1.0, -0.3, 0.0, 0.26, 0.9, 1.0, 3.0])
    grad = jax.grad(lambda v: jnp.sum(quant.fake_quant(v, -1.0, 1.0, 3) * jnp.arange(8.0)))(x)
    np.testing.assert_array_equal(grad, np.arange(8.0))
    clipped = jax.grad(lambda v: jnp.sum(quant.fake_quant(v, -1.0, 1.0, 3, ste='clipped')))(x)
    np.testing.assert_array_equal(clipped, [0, 1, 1, 1, 1, 1, 1, 0])


def test_no_gradient_reaches_the_range():
    x = jnp.array([0.1, 0.5, 0.9])
    for ste in quant.STE_MODES:
        g_lo, g_hi = jax.grad(lambda lo, hi: jnp.sum(quant.fake_quant(x, lo, hi, 3, ste)), argnums=(0, 1))(0.0, 1.0)
        assert g_lo == 0 and g_hi == 0
    # The weight quantizer's range is a function of w, yet w's gradient is still the identity.
    w = jnp.array([[0.3, -1.0], [2.0, 0.5]])
    np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(quant.quantize_weight(v, 2)))(w), np.ones((2, 2)))


def test_jit_and_vmap_agree_with_eager_broadcasting():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 50)).astype(np.float32))
    lo, hi = x.min(axis=1), x.max(axis=1)
    eager = quant.fake_quant(x, lo[:, None], hi[:, None], 3)
    jitted = jax.jit(quant.fake_quant, static_argnums=(3,))(x, lo[:, None], hi[:, None], 3)
    mapped = jax.vmap(lambda r, a, b: quant.fake_quant(r, a, b, 3))(x, lo, hi)
    # XLA may fuse the final division differently: equal up to float32 rounding.
    np.testing.assert_allclose(eager, jitted, rtol=1e-6)
    np.testing.assert_allclose(eager, mapped, rtol=1e-6)
    grad = jax.jit(jax.grad(lambda v: jnp.sum(jax.vmap(lambda r, a, b: quant.fake_quant(r, a, b, 3))(v, lo, hi))))(x)
    np.testing.assert_array_equal(grad, np.ones_like(x))


@pytest.mark.parametrize('bits', [0, 17, -1, 3.0, '3', True])
def test_bad_bit_widths_name_the_field(bits):
    with pytest.raises(ValueError, match=r'quant\.w_bits=.*1 to 16.*32'):
        quant.check_bits(bits, 'quant.w_bits')


def test_full_precision_spellings():
    assert quant.check_bits(32, 'f') is None and quant.check_bits(None, 'f') is None
    assert quant.check_bits(16, 'f') == 16 and quant.check_bits(1, 'f') == 1


def test_bad_ste_mode():
    with pytest.raises(ValueError, match="quant.ste='soft'.*'identity', 'clipped'"):
        quant.fake_quant(jnp.zeros(3), 0.0, 1.0, 3, ste='soft')


def _run_act(rule, batches):
    act = quant.QuantAct(bits=3, range_rule=rule)
    stats = act.init(jax.random.PRNGKey(0), jnp.zeros(4))['quant_stats']
    history = []
    step = jax.jit(lambda s, x: act.apply({'quant_stats': s}, x, calibrate=True, mutable=['quant_stats']))
    for x in batches:
        _, new = step(stats, x)
        stats = new['quant_stats']
        history.append((float(stats['x_min']), float(stats['x_max'])))
    return np.array(history), stats, act


def test_reference_range_update_sequence():
    # A constant batch max m: the reference's stored x_max goes m, m/0.19, ... (docs/algorithms.md 2.4).
    m = 2.0
    batches = [jnp.array([0.0, 0.5, m, 1.0])] * 300
    history, _, _ = _run_act('reference', batches)
    x_max = history[:, 1] / m
    expected, beta_t = [], 1.0
    value = 0.0
    for _ in range(300):                                 # the recurrence in float64, written out
        beta_t *= 0.9
        value = (value * 0.9 + 0.1) / (1 - beta_t)
        expected.append(value)
    np.testing.assert_allclose(x_max[:5], [1.0, 1 / 0.19, (0.9 / 0.19 + 0.1) / 0.271, 47.0, 104.0], rtol=2e-2)
    np.testing.assert_allclose(x_max[:150], expected[:150], rtol=1e-4)
    assert int(np.argmax(x_max)) == 20 and 3900 < x_max.max() < 4000          # update 21 peaks near 3945 m
    assert abs(x_max[-1] - 1.0) < 1e-4                                         # converged by update 300
    np.testing.assert_array_equal(history[:, 0], 0.0)                          # ReLU input: x_min stays 0


def test_ema_range_rule_is_seeded_with_the_first_batch():
    batches = [jnp.array([-1.0, 3.0]), jnp.array([-2.0, 1.0]), jnp.array([0.0, 2.0])]
    history, _, _ = _run_act('ema', batches)
    np.testing.assert_allclose(history[0], [-1.0, 3.0])
    np.testing.assert_allclose(history[1], [-1.1, 2.8], rtol=1e-6)
    np.testing.assert_allclose(history[2], [-0.99, 2.72], rtol=1e-6)


def test_frozen_range_is_used_unchanged():
    _, stats, act = _run_act('ema', [jnp.array([0.0, 4.0])])
    x = jnp.array([0.0, 1.0, 2.6, 9.0])
    out, new = act.apply({'quant_stats': stats}, x, calibrate=False, mutable=['quant_stats'])
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(a == b), new['quant_stats'], stats))
    np.testing.assert_allclose(out, numpy_reference(np.asarray(x), 0.0, 4.0, 3), rtol=1e-6)
    with pytest.raises(ValueError, match='mutable'):
        act.apply({'quant_stats': stats}, x, calibrate=True)


def test_traced_calibrate_flag_switches_inside_one_program():
    _, stats, act = _run_act('ema', [jnp.array([0.0, 4.0])])
    traces = []

    def apply(s, x, c):
        traces.append(None)
        return act.apply({'quant_stats': s}, x, calibrate=c, mutable=['quant_stats'])
    step = jax.jit(apply)
    x = jnp.array([0.0, 8.0])
    _, frozen = step(stats, x, jnp.asarray(False))
    _, updated = step(stats, x, jnp.asarray(True))
    assert float(frozen['quant_stats']['x_max']) == 4.0
    np.testing.assert_allclose(float(updated['quant_stats']['x_max']), 0.9 * 4.0 + 0.1 * 8.0, rtol=1e-6)
    assert len(traces) == 1, 'traced (compiled) once per calibrate value'


def test_full_precision_activation_is_identity_and_stateless():
    act = quant.QuantAct(bits=None)
    variables = act.init(jax.random.PRNGKey(0), jnp.zeros(3))
    assert not variables
    x = jnp.array([0.1, 0.2, 0.333])
    np.testing.assert_array_equal(act.apply(variables, x), x)

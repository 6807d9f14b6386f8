"""The comparisons of tests/trajectories.py: what each bound lets through and what it refuses."""

import numpy as np
import pytest

from tests import trajectories

A_BITS = 3


def ranges(x_min, x_max):
    return {'q/x_min': np.array([x_min]), 'q/x_max': np.array([x_max]), 'q/beta_t': np.array([0.5])}


def test_a_range_may_move_one_quantization_level_not_two():
    level = (2.0 - 0.0) / (2**A_BITS - 1)
    b = ranges(0.0, 2.0)
    trajectories.assert_ranges_close(ranges(0.0, 2.0 + 0.99 * level), b, 0.0, A_BITS)
    # A range at 0 (a ReLU's minimum) fits no relative bound; it may move one level too.
    trajectories.assert_ranges_close(ranges(0.9 * level, 2.0), b, 0.0, A_BITS)
    with pytest.raises(AssertionError, match='q/x_max'):
        trajectories.assert_ranges_close(ranges(0.0, 2.0 + 2 * level), b, 0.0, A_BITS)
    with pytest.raises(AssertionError, match='q'):
        trajectories.assert_ranges_close({**b, 'q/beta_t': np.array([0.25])}, b, 0.0, A_BITS)


def one_step(attention, mean, var=1.0, x_max=2.0, gradient=(1.0, 1e-6), accuracy=0.5):
    return {'calibrate/metrics/channel_attention': np.array([attention]),
            'calibrate/metrics/agreement': np.array([accuracy]),
            'calibrate/ranges/q/x_min': np.array([0.0]), 'calibrate/ranges/q/x_max': np.array([x_max]),
            'teacher/batch_stats/bn/mean': np.array([mean, 1.0]), 'teacher/batch_stats/bn/var': np.array([var, var]),
            'calibrate/generator_gradient/w': np.array(gradient[:1]),
            'calibrate/generator_gradient/b': np.array(gradient[1:])}


def test_one_step_bounds_follow_the_inputs_not_the_quantity():
    tol = 1e-3
    b = one_step(attention=0.012, mean=1e-4)
    # The attention loss is a difference of terms of size 2: 7e-3 of its own size passes.
    trajectories.assert_one_step_close(one_step(attention=0.012 + 8.9e-5, mean=1e-4), b, 8, tol=tol, a_bits=A_BITS)
    with pytest.raises(AssertionError, match='channel_attention'):
        trajectories.assert_one_step_close(one_step(attention=0.012 + 3 * tol, mean=1e-4), b, 8, tol=tol,
                                           a_bits=A_BITS)
    # A BN mean near 0 is measured against the layer's standard deviation.
    trajectories.assert_one_step_close(one_step(attention=0.012, mean=1e-4 + 5e-4), b, 8, tol=tol, a_bits=A_BITS)
    with pytest.raises(AssertionError, match='bn/mean'):
        trajectories.assert_one_step_close(one_step(attention=0.012, mean=1e-4 + 2e-3), b, 8, tol=tol, a_bits=A_BITS)
    # A gradient element that is zero up to rounding: against the whole gradient's largest.
    trajectories.assert_one_step_close(one_step(0.012, 1e-4, gradient=(1.0, -5e-4)), b, 8, tol=tol, a_bits=A_BITS)
    # One sample of the batch may flip; two may not.
    trajectories.assert_one_step_close(one_step(0.012, 1e-4, accuracy=0.5 + 1 / 8), b, 8, tol=tol, a_bits=A_BITS)
    with pytest.raises(AssertionError, match='agreement'):
        trajectories.assert_one_step_close(one_step(0.012, 1e-4, accuracy=0.75), b, 8, tol=tol, a_bits=A_BITS)
    # Ranges need the bit-width that sets their level.
    with pytest.raises(AssertionError, match='pass a_bits'):
        trajectories.assert_one_step_close(b, b, 8, tol=tol)

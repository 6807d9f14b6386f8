"""HAST's and SynQ's building blocks, each against a float64 numpy version written from the
upstream code's formulas (SynQ 8681480, HAST 83dfc16; the functions' docstrings give file:line):
selective cross-entropy, Grad-CAM and its alignment loss, the sign-gradient perturbation, the
Gaussian low-pass filter and the L_p clipping search. Tiny shapes only."""

import jax
import jax.numpy as jnp
import numpy as np

from bag_jax import losses


def np_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# --- selective cross-entropy ---------------------------------------------------------------

def np_selce(s, t, y, tau):
    """SynQ's masked CE in float64: dropped samples become zero logits with label 0, and the
    mean is over the whole batch. Returns (value, gradient w.r.t. s, keep)."""
    s, t = s.astype(np.float64), t.astype(np.float64)
    b, c = s.shape
    keep = (1.0 - np_softmax(t)[np.arange(b), y]) < tau
    logits = np.where(keep[:, None], s, 0.0)
    labels = np.where(keep, y, 0)
    p = np_softmax(logits)
    value = np.mean(-np.log(p[np.arange(b), labels]))
    grad = np.where(keep[:, None], p - np.eye(c)[labels], 0.0) / b
    return value, grad, keep


def selce_value_and_grads(s, t, y, tau):
    fn = lambda s_, t_: losses.selective_cross_entropy(s_, t_, jnp.asarray(y), tau)  # noqa: E731
    value, (g_s, g_t) = jax.value_and_grad(fn, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))
    return float(value), np.asarray(g_s), np.asarray(g_t)


def test_selective_cross_entropy_against_numpy():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(4, 5)).astype(np.float32)
    y = np.array([0, 3, 1, 4])
    t = rng.normal(size=(4, 5)).astype(np.float32)
    t[np.arange(4), y] += np.array([4.0, -2.0, 3.0, 0.0], np.float32)   # two easy, two hard samples
    value, grad, keep = np_selce(s, t, y, 0.5)
    assert keep.tolist() == [True, False, True, False]
    got, g_s, g_t = selce_value_and_grads(s, t, y, 0.5)
    np.testing.assert_allclose(got, value, rtol=1e-5)
    # Each dropped sample adds log C to the sum, without gradient.
    kept_ce = -np.log(np_softmax(s.astype(np.float64))[np.arange(4), y])[keep].sum()
    np.testing.assert_allclose(got, (kept_ce + 2 * np.log(5)) / 4, rtol=1e-5)
    np.testing.assert_allclose(g_s, grad, rtol=1e-5, atol=1e-7)
    assert np.all(g_s[~keep] == 0) and np.all(g_t == 0)


def test_selective_cross_entropy_none_kept_and_all_kept():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(3, 4)).astype(np.float32)
    y = np.array([2, 0, 1])
    # None kept (p_y = 1/4 everywhere): log C and no gradient.
    got, g_s, _ = selce_value_and_grads(s, np.zeros((3, 4), np.float32), y, 0.5)
    np.testing.assert_allclose(got, np.log(4), rtol=1e-6)
    assert np.all(g_s == 0)
    # All kept: the plain cross-entropy.
    t = np.eye(4, dtype=np.float32)[y] * 10.0
    got, g_s, _ = selce_value_and_grads(s, t, y, 0.5)
    value, grad, keep = np_selce(s, t, y, 0.5)
    assert keep.all()
    np.testing.assert_allclose(got, value, rtol=1e-5)
    np.testing.assert_allclose(got, float(losses.cross_entropy(jnp.asarray(s), jnp.asarray(y))), rtol=1e-6)
    np.testing.assert_allclose(g_s, grad, rtol=1e-5, atol=1e-7)


def test_selective_cross_entropy_threshold_is_strict():
    # Two classes and equal teacher logits: p_y = 0.5 exactly, difficulty 0.5: dropped at tau=0.5.
    s = np.array([[1.0, -1.0]], np.float32)
    t = np.zeros((1, 2), np.float32)
    y = np.array([0])
    np.testing.assert_allclose(selce_value_and_grads(s, t, y, 0.5)[0], np.log(2), rtol=1e-6)
    np.testing.assert_allclose(selce_value_and_grads(s, t, y, 0.5 + 1e-6)[0], np.log(1 + np.exp(-2.0)), rtol=1e-6)

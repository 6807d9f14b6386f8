"""HAST's and SynQ's building blocks, each against a float64 numpy version written from the
upstream code's formulas (SynQ 8681480, HAST 83dfc16; the functions' docstrings give file:line):
selective cross-entropy, Grad-CAM and its alignment loss, the sign-gradient perturbation, the
Gaussian low-pass filter and the L_p clipping search. Tiny shapes only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bag_jax import losses, quant
from bag_jax.data import transforms
from tests.quant_reference import numpy_reference


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


# --- Grad-CAM -------------------------------------------------------------------------------

def np_resize_bilinear(m, out_h, out_w):
    """PyTorch's F.interpolate(mode='bilinear', align_corners=False), written out: source index
    (i + 0.5) * in / out - 0.5, clamped at 0; neighbours floor and floor + 1, clamped at the end.
    m: (B, h, w)."""
    def matrix(n_in, n_out):
        a = np.zeros((n_out, n_in))
        for i in range(n_out):
            src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = min(int(np.floor(src)), n_in - 1)
            i1 = min(i0 + 1, n_in - 1)
            lam = src - i0
            a[i, i0] += 1 - lam
            a[i, i1] += lam
        return a
    ry, rx = matrix(m.shape[1], out_h), matrix(m.shape[2], out_w)
    return np.einsum('Hh,bhw,Ww->bHW', ry, m, rx)


def np_cam(f, grads, size, eps=1e-10):
    """SynQ's GradCAM.forward after the backward pass, in float64 (gradcam.py:167-193)."""
    f, g = f.astype(np.float64), grads.astype(np.float64)
    while np.any(g == 0):
        g = g + eps
    w = np.maximum(g.mean(axis=(1, 2)), eps)                            # (B, K)
    m = np.maximum((f * w[:, None, None, :]).sum(-1), 0.0)
    m = np_resize_bilinear(m, *size)
    lo = m.min(axis=(1, 2), keepdims=True)
    hi = m.max(axis=(1, 2), keepdims=True)
    return (m - lo) / (hi - lo + eps)


def pool_dense_head(w, b):
    """Global average pool, then dense: d logit_k / dF_hwc = W[c, k] / (h w)."""
    return lambda f: jnp.mean(f, axis=(1, 2)) @ w + b


def np_pool_dense_grads(f, w, b):
    f64 = f.astype(np.float64)
    top1 = np.argmax(f64.mean(axis=(1, 2)) @ w + b, axis=-1)
    h, wd = f.shape[1:3]
    return np.broadcast_to((w[:, top1].T / (h * wd))[:, None, None, :], f.shape), top1


@pytest.mark.parametrize('feature_shape, size', [((3, 4, 4, 6), (16, 16)), ((2, 3, 5, 4), (8, 12))])
def test_grad_cam_against_numpy(feature_shape, size):
    rng = np.random.default_rng(2)
    w = rng.normal(size=(feature_shape[-1], 5)).astype(np.float32)
    b = rng.normal(size=5).astype(np.float32) * 0.1
    # Sample i leans towards class i, so the samples' top-1 classes differ.
    f = (rng.normal(size=feature_shape) + 0.3 + 1.5 * w.T[:feature_shape[0], None, None, :]).astype(np.float32)
    grads, top1 = np_pool_dense_grads(f, w, b)
    logits = f.astype(np.float64).mean(axis=(1, 2)) @ w + b
    assert np.all(np.sort(logits, -1)[:, -1] - np.sort(logits, -1)[:, -2] > 1e-3)   # a clear top 1
    assert len(set(top1.tolist())) > 1
    got = losses.grad_cam(pool_dense_head(jnp.asarray(w), jnp.asarray(b)), jnp.asarray(f), size)
    assert got.shape == (feature_shape[0], *size)
    np.testing.assert_allclose(got, np_cam(f, grads, size), rtol=1e-5, atol=1e-6)
    assert np.allclose(np.min(got, axis=(1, 2)), 0) and np.allclose(np.max(got, axis=(1, 2)), 1, atol=1e-6)


def test_grad_cam_floors_weights_and_nudges_zero_gradients():
    # Class 0 wins (bias); its column is negative but for one zero: every weight is floored at
    # 1e-10, and the map is the normalized ReLU(1e-10 sum_k F_k), not zero.
    rng = np.random.default_rng(3)
    f = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    w = np.array([[-1.0, 0.5], [0.0, 0.2], [-0.5, 1.0]], np.float32)
    b = np.array([100.0, 0.0], np.float32)
    grads, top1 = np_pool_dense_grads(f, w, b)
    assert np.all(top1 == 0) and np.any(grads == 0)
    got = np.asarray(losses.grad_cam(pool_dense_head(jnp.asarray(w), jnp.asarray(b)), jnp.asarray(f), (8, 8)))
    expected = np_cam(f, grads, (8, 8))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    m = np.maximum(f.astype(np.float64).sum(-1), 0.0) * 1e-10          # the floored weights' map
    assert np.max(got) > 0.5 and np.max(m) < 1e-8


def square_pool_dense_head(w, b):
    """mean_hw(F^2) then dense: d logit_k / dF_hwc = 2 F_hwc W[c, k] / (h w), so the Grad-CAM
    weights depend on F and stopping their gradient matters."""
    return lambda f: jnp.mean(jnp.square(f), axis=(1, 2)) @ w + b


def np_square_head_grads(f, w, b):
    f = f.astype(np.float64)
    top1 = np.argmax((f**2).mean(axis=(1, 2)) @ w + b, axis=-1)
    return 2 * f * w[:, top1].T[:, None, None, :] / (f.shape[1] * f.shape[2])


def test_cam_alignment_loss_value_and_gradient_through_features_only():
    rng = np.random.default_rng(4)
    size = (8, 8)
    f_s = rng.normal(size=(2, 4, 4, 3)) + 0.5
    f_t = rng.normal(size=(2, 4, 4, 3)) + 0.5
    w_s, w_t = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    b = np.zeros(4)
    m_t = np_cam(f_t, np_square_head_grads(f_t, w_t, b), size)

    def np_loss(fs, frozen_grads=None):
        grads = np_square_head_grads(fs, w_s, b) if frozen_grads is None else frozen_grads
        return np.mean((m_t - np_cam(fs, grads, size))**2)

    b32 = jnp.asarray(b, jnp.float32)
    teacher_head = square_pool_dense_head(jnp.asarray(w_t, jnp.float32), b32)

    def loss(fs, ws):
        return losses.cam_alignment_loss(square_pool_dense_head(ws, b32), fs, teacher_head,
                                         jnp.asarray(f_t, jnp.float32), size)
    value, (g_f, g_w) = jax.value_and_grad(loss, argnums=(0, 1))(jnp.asarray(f_s, jnp.float32),
                                                                 jnp.asarray(w_s, jnp.float32))
    np.testing.assert_allclose(float(value), np_loss(f_s), rtol=1e-4)
    # The head's parameters get nothing: the weights are constants, and F does not depend on them.
    assert np.all(np.asarray(g_w) == 0)
    # The gradient w.r.t. F: central differences with the Grad-CAM weights frozen at f_s's.
    frozen = np_square_head_grads(f_s, w_s, b)
    h = 1e-6
    fd = np.zeros_like(f_s)
    for i in np.ndindex(f_s.shape):
        up, down = f_s.copy(), f_s.copy()
        up[i] += h
        down[i] -= h
        fd[i] = (np_loss(up, frozen) - np_loss(down, frozen)) / (2 * h)
    scale = np.max(np.abs(fd))
    np.testing.assert_allclose(np.asarray(g_f), fd, atol=2e-3 * scale)
    # Differentiating through the weights too would give another gradient.
    full = np.zeros_like(f_s)
    for i in np.ndindex(f_s.shape):
        up, down = f_s.copy(), f_s.copy()
        up[i] += h
        down[i] -= h
        full[i] = (np_loss(up) - np_loss(down)) / (2 * h)
    assert np.max(np.abs(full - fd)) > 0.1 * scale


def test_jax_image_resize_is_pytorch_bilinear_without_align_corners():
    m = np.random.default_rng(5).normal(size=(2, 3, 5))
    for size in [(12, 10), (6, 15), (2, 3)]:
        got = jax.image.resize(jnp.asarray(m, jnp.float32), (2, *size), 'bilinear', antialias=False)
        np.testing.assert_allclose(got, np_resize_bilinear(m, *size), rtol=1e-5, atol=1e-6)


# --- HAST's sign-gradient perturbation ----------------------------------------------------------

def test_sign_perturbation_of_a_quadratic():
    # loss = sum a (x - c)^2, gradient 2 a (x - c): zero where x = c or a = 0.
    a = jnp.array([1.0, 2.0, 0.0, 0.5, 3.0])
    c = jnp.array([0.5, -1.0, 2.0, 0.25, 1.0])
    x = jnp.array([1.0, -1.0, 0.0, -0.75, 1.5])
    loss = lambda v: jnp.sum(a * jnp.square(v - c))     # noqa: E731
    got = losses.sign_perturbation(loss, x, 0.01)
    expected = np.array([1.0, -1.0, 0.0, -0.75, 1.5]) + 0.01 * np.array([1, 0, 0, -1, 1])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # The perturbation is a constant: the Jacobian w.r.t. x is the identity.
    jacobian = jax.jacobian(lambda v: losses.sign_perturbation(loss, v, 0.01))(x)
    np.testing.assert_array_equal(jacobian, np.eye(5))


# --- low-pass filter ----------------------------------------------------------------------------

def np_low_pass(images, d0):
    """SynQ's filter with explicit DFT matrices in float64, the mask written in the unshifted
    layout: frequency k of an n-point DFT is k for k < n - n // 2, else k - n (fftshift's centre
    index n // 2 holds frequency 0)."""
    images = images.astype(np.float64)
    _, h, w, _ = images.shape

    def dft(n):
        k = np.arange(n)
        return np.exp(-2j * np.pi * np.outer(k, k) / n)

    def freq(n):
        k = np.arange(n)
        return np.where(k < n - n // 2, k, k - n)
    mask = np.exp(-(freq(h)[:, None]**2 + freq(w)[None, :]**2) / (2 * d0**2))
    fy, fx = dft(h), dft(w)
    spectrum = np.einsum('Hh,nhwc,Ww->nHWc', fy, images, fx) * mask[None, :, :, None]
    back = np.einsum('hH,nHWc,wW->nhwc', fy.conj() / h, spectrum, fx.conj() / w)
    return back.real


@pytest.mark.parametrize('shape, d0', [((2, 8, 8, 3), 3.0), ((1, 7, 5, 2), 2)])
def test_low_pass_filter_against_numpy_dft(shape, d0):
    images = np.random.default_rng(6).normal(size=shape).astype(np.float32)
    got = transforms.low_pass_filter(jnp.asarray(images), d0)
    assert got.shape == shape and got.dtype == jnp.float32
    expected = np_low_pass(images, d0)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.max(np.abs(expected - images)) > 0.1                       # it does filter


def test_low_pass_filter_passes_constants_and_mask_values():
    const = jnp.full((2, 8, 6, 3), 0.7, jnp.float32) * jnp.arange(1.0, 4.0)
    np.testing.assert_allclose(transforms.low_pass_filter(const, 1.5), const, rtol=1e-5)
    mask = transforms.gaussian_low_pass_mask(32, 32, 20)
    assert float(mask[16, 16]) == 1.0
    np.testing.assert_allclose(float(mask[0, 0]), np.exp(-(16**2 + 16**2) / 800), rtol=1e-6)
    assert round(float(mask[0, 0]), 2) == 0.53
    assert round(float(transforms.gaussian_low_pass_mask(32, 32, 80)[0, 0]), 2) == 0.96
    assert round(float(transforms.gaussian_low_pass_mask(224, 224, 80)[0, 0]), 2) == 0.14
    with pytest.raises(ValueError, match='d0'):
        transforms.gaussian_low_pass_mask(8, 8, 0)


# --- L_p clipping search --------------------------------------------------------------------------

def brute_force_lp_clip(x, bits, p=2.4, num_candidates=80):
    """SynQ's QuantActMSE loop: candidates in order, the first strictly smaller error wins.
    Returns (lo, hi, scores)."""
    x = np.asarray(x, np.float32).ravel()
    x_min, x_max = x.min(), x.max()
    best, scores = None, []
    for i in range(num_candidates):
        f = np.float32(1.0 - i * 0.01)
        lo, hi = x_min * f, x_max * f
        score = np.mean(np.abs(x.astype(np.float64) - numpy_reference(x, lo, hi, bits))**p)
        scores.append(score)
        if best is None or score < best[0]:
            best = (score, lo, hi)
    return best[1], best[2], np.array(scores)


@pytest.mark.parametrize('bits', [2, 3, 4])
def test_lp_clip_range_against_brute_force(bits):
    x = np.random.default_rng(bits).normal(size=(4, 4, 4, 8)).astype(np.float32)
    lo, hi, scores = brute_force_lp_clip(x, bits)
    best, second = np.sort(scores)[:2]
    assert second > best * (1 + 1e-4)                                    # no near tie to flip
    got = quant.lp_clip_range(jnp.asarray(x), bits)
    np.testing.assert_allclose([float(got[0]), float(got[1])], [lo, hi], rtol=1e-6)
    assert hi < x.max()                                                  # a Gaussian is clipped


def test_lp_clip_range_on_uniform_samples_and_outliers():
    rng = np.random.default_rng(7)
    uniform = rng.uniform(size=255).astype(np.float32)

    def factor(x, bits):
        lo, hi = quant.lp_clip_range(jnp.asarray(x), bits)
        np.testing.assert_allclose([float(lo), float(hi)], brute_force_lp_clip(x, bits)[:2], rtol=1e-6)
        assert float(lo) == pytest.approx(x.min() * float(hi) / x.max(), rel=1e-6)
        return float(hi) / x.max()
    # Uniform samples keep their range at 8 bits; at 3 bits the coarse grid pays for a little clipping.
    assert factor(uniform, 8) == pytest.approx(1.0)
    assert 0.9 <= factor(uniform, 3) < 1.0
    # An outlier at 10x the bulk is clipped at 3 bits (to 7.5)...
    assert factor(np.append(uniform, np.float32(10.0)), 3) < 0.8
    # ...but one at 50x is kept: with p = 2.4 its clipping error outweighs the finer grid.
    assert factor(np.append(uniform, np.float32(50.0)), 3) == pytest.approx(1.0)
    with pytest.raises(ValueError, match='num_candidates'):
        quant.lp_clip_range(jnp.asarray(uniform), 3, num_candidates=101)
    with pytest.raises(ValueError, match='bits'):
        quant.lp_clip_range(jnp.asarray(uniform), 32)

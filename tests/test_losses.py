"""Each loss against a float64 numpy version written from the reference code's formulas (docs/algorithms.md 4,
8.2b), plus hand-checked properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bag_jax import losses


def np_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def np_ce(logits, y):
    return float(np.mean(-np.log(np_softmax(logits)[np.arange(len(y)), y])))


def np_entropy(logits):
    p = np_softmax(logits)
    return -(p * np.log(p)).sum(-1)


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(16, 100)) * 3
    s = t + rng.normal(size=(16, 100))
    y = rng.integers(0, 100, size=16)
    return t, s, y


def close(a, b, rtol=1e-5):
    np.testing.assert_allclose(float(a), float(b), rtol=rtol, atol=1e-6)


def test_cross_entropy_and_entropy(logits):
    t, _, y = logits
    close(losses.cross_entropy(jnp.asarray(t, jnp.float32), jnp.asarray(y)), np_ce(t, y))
    np.testing.assert_allclose(losses.entropy(jnp.asarray(t, jnp.float32)), np_entropy(t), rtol=1e-4)
    close(losses.entropy(jnp.zeros((1, 100)))[0], np.log(100))


def test_bns_loss_by_hand():
    # One BN, 2 channels: input mean (1, 3), biased var (1, 4); running (0, 3), (2, 4).
    x = np.zeros((2, 1, 2, 2), np.float32)
    x[..., 0] = [[[0, 2]], [[0, 2]]]           # values 0, 2, 0, 2: mean 1, biased var 1
    x[..., 1] = [[[1, 5]], [[1, 5]]]           # values 1, 5, 1, 5: mean 3, biased var 4
    pair = (jnp.asarray(x), jnp.array([0.0, 3.0]), jnp.array([2.0, 4.0]))
    # mean_c (mu - rm)^2 = (1 + 0) / 2, mean_c (var - rv)^2 = (1 + 0) / 2
    close(losses.bns_loss([pair]), 1.0)
    # The mean over BNs: a second, perfectly matched BN halves it.
    matched = (jnp.asarray(x), jnp.array([1.0, 3.0]), jnp.array([1.0, 4.0]))
    close(losses.bns_loss([pair, matched]), 0.5)


def test_kd_loss_is_kldivloss_mean_times_t_squared(logits):
    t, s, _ = logits
    T = 20.0
    p_t, p_s = np_softmax(t / T), np_softmax(s / T)
    kl_elementwise = p_t * (np.log(p_t) - np.log(p_s))       # nn.KLDivLoss(log p_s, p_t) elements
    expected = T**2 * kl_elementwise.sum() / kl_elementwise.size
    got = losses.kd_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), T)
    close(got, expected, rtol=1e-4)
    batchmean_kl = kl_elementwise.sum() / len(t)
    close(got, T**2 / 100 * batchmean_kl, rtol=1e-4)               # = 4 x batch-mean KL (docs/algorithms.md 9.2)


def test_gdfq_losses(logits):
    t, s, y = logits
    tj, sj, yj = jnp.asarray(t, jnp.float32), jnp.asarray(s, jnp.float32), jnp.asarray(y)
    close(losses.gdfq_generator_loss(tj, yj, 2.0, 0.1), np_ce(t, y) + 0.2)
    expected = np_ce(s, y) + float(losses.kd_loss(sj, tj, 20.0))
    close(losses.gdfq_student_loss(sj, tj, yj, 20.0, 1.0), expected)


def np_normalized_entropy(t, s):
    h = np_entropy(t - s)
    return (h - h.min()) / (np.log(t.shape[1]) - h.min())


def test_margin_and_balance_losses(logits):
    t, s, y = logits
    tj, sj, yj = jnp.asarray(t, jnp.float32), jnp.asarray(s, jnp.float32), jnp.asarray(y)
    h = np_normalized_entropy(t, s)
    assert h.min() == 0.0
    np.testing.assert_allclose(losses.normalized_entropy(tj, sj), h, rtol=1e-4, atol=1e-6)
    expected_margin = np.mean(np.maximum(0.1 - h, 0)) + np.mean(np.maximum(h - 0.8, 0))
    close(losses.margin_loss(tj, sj, 0.1, 0.8), expected_margin, rtol=1e-4)
    close(losses.balance_loss(tj, sj, yj, 0.2, 0.1), 0.2 * np_ce(t - s, y) + 0.1 * np_ce(t + s, y))
    total = losses.adadfq_generator_loss(tj, sj, yj, 0.5)
    close(total, expected_margin + 0.2 * np_ce(t - s, y) + 0.1 * np_ce(t + s, y) + 0.5, rtol=1e-4)


@pytest.mark.parametrize('batch', [1, 2, 16, 200])
def test_margin_loss_any_batch_size_and_lowest_entropy_sample(batch):
    rng = np.random.default_rng(batch)
    t, s = rng.normal(size=(batch, 10)) * 2, rng.normal(size=(batch, 10))
    got = float(losses.margin_loss(jnp.asarray(t, jnp.float32), jnp.asarray(s, jnp.float32), 0.1, 0.8))
    assert np.isfinite(got)
    # The lowest-entropy sample has H' = 0 and always adds lambda_l / B (docs/algorithms.md 4.3).
    assert got >= 0.1 / batch - 1e-6


def test_adadfq_student_loss(logits):
    t, s, _ = logits
    T = 20.0
    expected = -T**2 * np.mean(np_entropy((t - s) / T))
    got = losses.adadfq_student_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), T)
    close(got, expected, rtol=1e-5)
    # Second order: L_Q ~ 1/2 mean_b Var_c(t - s) - T^2 log C (docs/algorithms.md 4.3), at difference std 1.
    approx = 0.5 * np.mean(np.var(t - s, axis=-1)) - T**2 * np.log(100)
    np.testing.assert_allclose(float(got) + T**2 * np.log(100), approx + T**2 * np.log(100), rtol=0.05)
    # A per-sample shift of the logits costs nothing: the optimum is t up to a constant.
    shifted = jnp.asarray(t + rng_shift(t), jnp.float32)
    close(losses.adadfq_student_loss(shifted, jnp.asarray(t, jnp.float32), T), -T**2 * np.log(100), rtol=1e-6)


def rng_shift(t):
    return np.random.default_rng(1).normal(size=(t.shape[0], 1)) * 5


def test_channel_attention_forms_by_hand():
    f = np.zeros((1, 2, 1, 2), np.float32)
    f[0, :, 0, 0] = [3.0, -3.0]                # energy 9, mean 0
    f[0, :, 0, 1] = [4.0, 4.0]                 # energy 16, mean 4
    np.testing.assert_allclose(losses.channel_attention(jnp.asarray(f), 'energy'), [[9 / np.hypot(9, 16), 16 / np.hypot(9, 16)]], rtol=1e-6)
    np.testing.assert_allclose(losses.channel_attention(jnp.asarray(f), 'mean'), [[0.0, 4.0]], atol=1e-6)
    np.testing.assert_allclose(losses.channel_attention(jnp.asarray(f), 'softmax'), [np_softmax(np.array([9.0, 16.0]))], rtol=1e-5)


def test_channel_attention_loss_against_numpy():
    rng = np.random.default_rng(3)
    shapes = [(4, 8, 8, 16), (4, 4, 4, 32)]
    fs = [rng.normal(size=sh).astype(np.float32) for sh in shapes]
    ft = [rng.normal(size=sh).astype(np.float32) * 2 + 0.5 for sh in shapes]

    def att(f):
        v = (f.astype(np.float64)**2).mean(axis=(1, 2))
        return v / np.linalg.norm(v, axis=-1, keepdims=True)
    expected = sum(np.mean(np.sum((att(a) - att(b))**2, axis=-1)) for a, b in zip(fs, ft))
    close(losses.channel_attention_loss([jnp.asarray(a) for a in fs], [jnp.asarray(b) for b in ft]), expected, rtol=1e-4)
    expected_mean = sum(np.mean((a.mean(axis=(1, 2)) - b.mean(axis=(1, 2)))**2) for a, b in zip(fs, ft))
    close(losses.channel_attention_loss([jnp.asarray(a) for a in fs], [jnp.asarray(b) for b in ft], 'mean'),
          expected_mean, rtol=1e-4)

    def soft(f):
        return np_softmax(np_softmax((f.astype(np.float64)**2).mean(axis=(1, 2))) / 8.0)
    expected_kl = sum(np.mean(np.sum(soft(b) * (np.log(soft(b)) - np.log(soft(a))), axis=-1)) for a, b in zip(fs, ft))
    close(losses.channel_attention_loss([jnp.asarray(a) for a in fs], [jnp.asarray(b) for b in ft], 'softmax'),
          expected_kl, rtol=1e-3)
    # Identical features: zero loss. Teacher side gets no gradient.
    close(losses.channel_attention_loss([jnp.asarray(fs[0])], [jnp.asarray(fs[0])]), 0.0)
    g = jax.grad(lambda b: losses.channel_attention_loss([jnp.asarray(fs[0])], [b]))(jnp.asarray(ft[0]))
    assert float(jnp.abs(g).max()) == 0.0
    with pytest.raises(ValueError, match='feature maps'):
        losses.channel_attention_loss([jnp.asarray(fs[0])], [])

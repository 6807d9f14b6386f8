"""The losses of GDFQ, AdaDFQ and BAG as pure functions of arrays (docs/algorithms.md 4 and 8.2b),
and the student-side terms of HAST and SynQ (selective cross-entropy, Grad-CAM alignment, the
sign-gradient perturbation), read from their code: snudm-starlab/SynQ at 8681480 and
lihuantong/HAST at 83dfc16.

Notation: t = teacher logits P(x), s = student logits Q(x), y = the labels the generator was
conditioned on, all (B, C) / (B,). Each loss returns a scalar (float32 array).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

# AKT's second softening of its channel-attention vectors (docs/algorithms.md 8.2b).
SOFTMAX_ATTENTION_TEMPERATURE = 8.0
# SynQ's Grad-CAM epsilon: the nudge of zero gradients, the floor of the channel weights and the
# min-max normalization's guard (SynQ src/gradcam.py:122, 167-168, 179, 193).
GRAD_CAM_EPS = 1e-10


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy, mean over the batch (PyTorch's nn.CrossEntropyLoss)."""
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=-1))


def entropy(logits: jax.Array) -> jax.Array:
    """Per-sample entropy -sum_c p_c log p_c of softmax(logits). Returns (B,)."""
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def bns_loss(pairs: Sequence[tuple[jax.Array, jax.Array, jax.Array]]) -> jax.Array:
    """BN-statistics loss over the teacher's BatchNorms (docs/algorithms.md 4.1).

    `pairs` holds (BN input (B, H, W, C), running_mean (C,), running_var (C,)) per BN. For each,
    the batch mean and biased variance over (B, H, W) are matched to the running statistics by
    channel-mean squared error; the result is the mean over BNs.
    """
    terms = []
    for x, running_mean, running_var in pairs:
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(x, axis=axes)
        var = jnp.mean(jnp.square(x - mean), axis=axes)
        terms.append(jnp.mean(jnp.square(mean - running_mean)) + jnp.mean(jnp.square(var - running_var)))
    return sum(terms) / len(terms)


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """GDFQ's distillation term: T^2 * nn.KLDivLoss()(log_softmax(s/T), softmax(t/T)).

    KLDivLoss's default 'mean' reduction divides the summed KL by B*C, not B, so this equals
    (T^2 / C) * batch-mean KL(p_t || p_s) (docs/algorithms.md 4.2, pitfall 9.2).
    """
    log_p_s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    log_p_t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    return temperature**2 * jnp.mean(jnp.exp(log_p_t) * (log_p_t - log_p_s))


def batchmean_kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float,
                      alpha: float) -> jax.Array:
    """HAST's and SynQ's distillation term: alpha T^2 nn.KLDivLoss(reduction='batchmean'), i.e.
    alpha T^2 times the batch-mean KL(softmax(t/T) || softmax(s/T)), summed over the classes
    (HAST trainer_direct.py loss_fn_kd; SynQ src/trainer_direct.py:200-217, alpha = T = 20). It
    is C * alpha times `kd_loss`. SynQ's `+ 1e-7` on the log-probabilities shifts the value by a
    constant 1e-7 alpha T^2 and is left out. The teacher's logits are not detached: where they
    depend on the input, so does the gradient with respect to it (HAST's perturbation).
    """
    log_p_s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    log_p_t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return alpha * temperature**2 * jnp.mean(kl)


def gdfq_generator_loss(teacher_logits, labels, bns, bns_weight: float = 0.1) -> jax.Array:
    """GDFQ's L_G = CE(t, y) + 0.1 * BNS (docs/algorithms.md 4.2)."""
    return cross_entropy(teacher_logits, labels) + bns_weight * bns


def gdfq_student_loss(student_logits, teacher_logits, labels, temperature: float = 20.0,
                      kd_weight: float = 1.0) -> jax.Array:
    """GDFQ's L_Q = CE(s, y) + alpha * kd_loss(s, t, T) (docs/algorithms.md 4.2)."""
    return cross_entropy(student_logits, labels) + kd_weight * kd_loss(student_logits, teacher_logits, temperature)


def normalized_entropy(teacher_logits, student_logits) -> jax.Array:
    """AdaDFQ's sample adaptability H'_b in [0, 1] (docs/algorithms.md 4.3). Returns (B,).

    H_b is the entropy of the disagreement distribution softmax(t_b - s_b); H' rescales it by the
    batch minimum (not detached, as in the reference) and the maximum log C.
    """
    h = entropy(teacher_logits - student_logits)
    h_max = jnp.log(teacher_logits.shape[-1])
    h_min = jnp.min(h)
    return (h - h_min) / (h_max - h_min)


def margin_loss(teacher_logits, student_logits, lambda_l: float = 0.1, lambda_u: float = 0.8) -> jax.Array:
    """AdaDFQ's hinge keeping H' inside [lambda_l, lambda_u] (docs/algorithms.md 4.3), for any batch size."""
    h = normalized_entropy(teacher_logits, student_logits)
    return jnp.mean(jnp.maximum(lambda_l - h, 0.0)) + jnp.mean(jnp.maximum(h - lambda_u, 0.0))


def balance_loss(teacher_logits, student_logits, labels, alpha_ds: float = 0.2, alpha_as: float = 0.1) -> jax.Array:
    """AdaDFQ's L_bal = alpha_ds CE(t - s, y) + alpha_as CE(t + s, y) (docs/algorithms.md 4.3)."""
    return (alpha_ds * cross_entropy(teacher_logits - student_logits, labels)
            + alpha_as * cross_entropy(teacher_logits + student_logits, labels))


def adadfq_generator_loss(teacher_logits, student_logits, labels, bns, *, lambda_l=0.1, lambda_u=0.8,
                          alpha_ds=0.2, alpha_as=0.1, balance=1.0, bns_weight=1.0) -> jax.Array:
    """AdaDFQ's L_G = L_margin + beta L_bal + gamma BNS; no plain CE(t, y) term (docs/algorithms.md 4.3)."""
    return (margin_loss(teacher_logits, student_logits, lambda_l, lambda_u)
            + balance * balance_loss(teacher_logits, student_logits, labels, alpha_ds, alpha_as)
            + bns_weight * bns)


def adadfq_student_loss(student_logits, teacher_logits, temperature: float = 20.0) -> jax.Array:
    """AdaDFQ's L_Q = -T^2 mean_b H(softmax((t_b - s_b) / T)) (docs/algorithms.md 4.3, pitfall 9.4).

    The student maximizes the entropy of the tempered disagreement: its logits approach the
    teacher's up to a per-sample shift.
    """
    return -temperature**2 * jnp.mean(entropy((teacher_logits - student_logits) / temperature))


def channel_attention(features: jax.Array, form: str = 'energy') -> jax.Array:
    """Per-sample channel attention of a feature map (B, H, W, C). Returns (B, C).

    'energy':  v_c = mean_hw F_c^2, L2-normalized over channels (docs/algorithms.md 8.2b, the default;
               'energy_mean' is the same vector, compared by `channel_attention_loss` as HAST does);
    'mean':    v_c = mean_hw F_c, no normalization (Channel Distillation, Zhou et al. 2020);
    'softmax': softmax_c(mean_hw F_c^2) (AKT).
    """
    axes = tuple(range(1, features.ndim - 1))
    if form == 'mean':
        return jnp.mean(features, axis=axes)
    energy = jnp.mean(jnp.square(features), axis=axes)
    if form == 'softmax':
        return jax.nn.softmax(energy, axis=-1)
    norm = jnp.sqrt(jnp.sum(jnp.square(energy), axis=-1, keepdims=True))
    return energy / jnp.maximum(norm, 1e-12)


def channel_attention_loss(student_features: Sequence[jax.Array], teacher_features: Sequence[jax.Array],
                           form: str = 'energy', detach_teacher: bool = True) -> jax.Array:
    """Channel-attention distillation, summed over the distilled layers (docs/algorithms.md 8.2b).

    'energy':  sum_l mean_b ||A_s - A_t||_2^2 of the normalized energy vectors;
    'energy_mean': sum_l mean_{b,c} (A_s - A_t)^2 of the same vectors: HAST's and SynQ's feature
               alignment (HAST trainer_direct.py loss_fa, weighted by lambda = 1000), 1/C_l of 'energy';
    'mean':    sum_l mean_{b,c} (v_s - v_t)^2 (Channel Distillation's MSE);
    'softmax': sum_l mean_b KL(softmax(A_t / 8) || softmax(A_s / 8)) (AKT's softened KL, averaged
               over the batch rather than summed, so the weight does not depend on batch size).
    The teacher features are taken as constants unless `detach_teacher` is False (HAST takes the
    input gradient of its loss with the teacher's features attached).
    """
    if len(student_features) != len(teacher_features):
        raise ValueError(f'{len(student_features)} student feature maps against {len(teacher_features)} of the teacher.')
    total = 0.0
    for fs, ft in zip(student_features, teacher_features):
        a_s = channel_attention(fs, 'energy' if form == 'energy_mean' else form)
        a_t = channel_attention(ft, 'energy' if form == 'energy_mean' else form)
        if detach_teacher:
            a_t = jax.lax.stop_gradient(a_t)
        if form in ('mean', 'energy_mean'):
            total += jnp.mean(jnp.square(a_s - a_t))
        elif form == 'softmax':
            log_q = jax.nn.log_softmax(a_s / SOFTMAX_ATTENTION_TEMPERATURE, axis=-1)
            log_p = jax.nn.log_softmax(a_t / SOFTMAX_ATTENTION_TEMPERATURE, axis=-1)
            total += jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))
        else:
            total += jnp.mean(jnp.sum(jnp.square(a_s - a_t), axis=-1))
    return total


def selective_cross_entropy(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
                            tau: float) -> jax.Array:
    """SynQ's selective cross-entropy (SelCE): CE(s, y) only on the samples the teacher finds easy.

    Sample b is kept where its difficulty 1 - p_t(y_b) is below tau, p_t = softmax(t): the strict
    `(1 - p) < tau` of SynQ src/trainer_direct.py:495-499, that is p_t(y_b) > 1 - tau. The teacher
    only selects; no gradient reaches it.

    The average is SynQ's (src/trainer_direct.py:287-292): a dropped sample is not removed but
    replaced by all-zero logits and label 0, and nn.CrossEntropyLoss takes the mean over the full
    batch. Each dropped sample therefore adds log C, a constant without gradient:
        value = (sum_{kept} CE(s_b, y_b) + (B - n_kept) log C) / B,
    whose gradient is that of mean_b(keep_b * CE(s_b, y_b)). A batch with no sample kept gives
    log C and a zero gradient; with all kept it is `cross_entropy(s, y)`. Returns a scalar.
    """
    p_label = jnp.take_along_axis(jax.nn.softmax(teacher_logits, axis=-1), labels[:, None], axis=-1)[:, 0]
    keep = jax.lax.stop_gradient((1.0 - p_label) < tau)
    kept_logits = jnp.where(keep[:, None], student_logits, jnp.zeros_like(student_logits))
    kept_labels = jnp.where(keep, labels, jnp.zeros_like(labels))
    return cross_entropy(kept_logits, kept_labels)


def grad_cam(head: Callable[[jax.Array], jax.Array], features: jax.Array,
             image_size: tuple[int, int]) -> jax.Array:
    """SynQ's Grad-CAM map of each sample's top-1 class (SynQ src/gradcam.py:114-195).

    `features` is F, the output of the network's last convolution (B, h, w, K), NHWC; `head` maps
    F to the logits (B, C) (in SynQ, F is the output of the last Conv2d module itself, so the head
    starts at that convolution's BatchNorm). With g = d(logit of argmax_c)/dF, computed per sample:
      1. if any element of g (over the whole batch) is exactly 0, every element gets +1e-10,
         repeated while one still is (SynQ's `while torch.any(gradients == 0)`);
      2. channel weights w_bk = max(mean_hw g_bhwk, 1e-10): the weights are clamped, at 1e-10
         rather than 0, so a sample whose weights are all negative gets the map of 1e-10 * sum_k F;
      3. map = ReLU(sum_k w_k F_k), (B, h, w);
      4. upsampled to `image_size` (H, W) bilinearly with half-pixel centres, PyTorch's
         F.interpolate(mode='bilinear', align_corners=False): jax.image.resize with
         antialias=False computes the same (checked in tests/test_synq_terms.py);
      5. min-max normalized per sample: (m - min) / (max - min + 1e-10).
    The weights are constants (stop_gradient), as SynQ's come from a backward hook without
    create_graph: a gradient of the map reaches `head`'s parameters and the network below only
    through F. Returns (B, H, W) in [0, 1], of F's dtype.
    """
    logits, pullback = jax.vjp(head, jax.lax.stop_gradient(features))
    return grad_cam_from_gradients(features, pullback(top1_cotangent(logits))[0], image_size)


def top1_cotangent(logits: jax.Array) -> jax.Array:
    """The one-hot of each sample's top-1 class: the cotangent whose pullback is d(top-1 logit)."""
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=logits.dtype)


def grad_cam_from_gradients(features: jax.Array, grads: jax.Array, image_size: tuple[int, int]) -> jax.Array:
    """Steps 1-5 of `grad_cam` from `grads` = d(top-1 logit)/d`features` however it was computed
    (bag_jax.step takes it from the whole network's VJP at its last convolution's output). The
    gradients are constants; the map's gradient reaches `features` only."""
    # Cut the gradient before the loop: reverse-mode differentiation cannot pass a while_loop.
    grads = jax.lax.stop_gradient(grads)
    grads = jax.lax.while_loop(lambda g: jnp.any(g == 0), lambda g: g + GRAD_CAM_EPS, grads)
    weights = jnp.maximum(jnp.mean(grads, axis=(1, 2)), GRAD_CAM_EPS)
    cam = jax.nn.relu(jnp.sum(features * weights[:, None, None, :], axis=-1))
    cam = jax.image.resize(cam, (cam.shape[0], *image_size), 'bilinear', antialias=False)
    lo = jnp.min(cam, axis=(1, 2), keepdims=True)
    hi = jnp.max(cam, axis=(1, 2), keepdims=True)
    return (cam - lo) / (hi - lo + GRAD_CAM_EPS)


def cam_alignment_loss(student_head: Callable[[jax.Array], jax.Array], student_features: jax.Array,
                       teacher_head: Callable[[jax.Array], jax.Array], teacher_features: jax.Array,
                       image_size: tuple[int, int]) -> jax.Array:
    """SynQ's CAM alignment: MSE(map_T, map_S) of the two `grad_cam` maps (SynQ
    src/trainer_direct.py:255-274), the mean over B * H * W.

    Each network's map is of its own top-1 class. The teacher's map is a constant
    (stop_gradient); the student's reaches the student only through `student_features` (see
    `grad_cam`). SynQ computes both on the clean images, not the perturbed ones (:531). Returns a
    scalar; SynQ weighs it by lambda_CAM (200 by default, src/main_direct.py:617).
    """
    map_t = jax.lax.stop_gradient(grad_cam(teacher_head, teacher_features, image_size))
    map_s = grad_cam(student_head, student_features, image_size)
    return jnp.mean(jnp.square(map_t - map_s))


def sign_perturbation(loss_fn: Callable[[jax.Array], jax.Array], x: jax.Array, epsilon: float) -> jax.Array:
    """HAST's perturbed input x + epsilon * sign(grad_x loss_fn(x)) (HAST trainer_direct.py:304-316;
    SynQ src/trainer_direct.py:511-515 takes it as is), with sign(0) = 0 (torch.sgn).

    The perturbation is a constant (stop_gradient): the gradient of the result with respect to x
    is the identity. HAST detaches the whole perturbed image; its x is data, so the two agree,
    and where x carries a gradient (a generator batch) pass stop_gradient(x) for HAST's behaviour.
    In HAST and SynQ the loss whose input gradient is taken is the student loss with the teacher
    evaluated on x too (its logits are not detached there), so `loss_fn` should run both
    networks. HAST's epsilon is 0.01 (hard-coded, options.py:60-61). Returns an array of x's
    shape and dtype.
    """
    return sign_step(x, jax.grad(loss_fn)(x), epsilon)


def sign_step(x: jax.Array, grad: jax.Array, epsilon) -> jax.Array:
    """x + epsilon * sign(grad), the step a constant (`sign_perturbation` from a gradient already
    computed: bag_jax.step takes it from the student step's own backward pass)."""
    return x + jax.lax.stop_gradient(epsilon * jnp.sign(grad)).astype(x.dtype)

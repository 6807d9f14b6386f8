"""HAST's synthetic pool: a fixed set of images made from Gaussian noise by optimising it on the
teacher alone, before any student trains (HAST data_generate/distill_data.py, which SynQ reuses).

Each batch of `PoolSpec.batch_size` images starts as N(0, 1) noise in the teacher's (normalized)
input space, with labels drawn uniformly, and takes `steps` Adam steps on

    L = BNS(x) + focal * mean_b((1 - p_b)^gamma CE(t_b, y_b)),    p_b = softmax(t_b)[y_b],

BNS being the BN-statistics loss of the teacher (bag_jax.losses.bns_loss: the mean over BNs of
the MSEs of batch mean and biased variance against the running statistics, HAST's formula) and
the second term HAST's hard-sample (focal) weighting; (1 - p)^gamma is differentiated too, as
there. The learning rate follows PyTorch's ReduceLROnPlateau on the total loss (factor 0.1,
patience 50, relative threshold 1e-4, floor 1e-4). HAST's CIFAR pool: 5,120 images, batch 256,
1,000 steps, lr 0.5, focal 10, gamma 2 (ImageNet: focal 0.1, gamma 0.5).

Not reproduced: HAST's ImageNet generation flips and crops the noise at random in half of the
steps; here no augmentation is applied while the pool is made (HAST's CIFAR setting).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from bag_jax import losses
from bag_jax.models import bn_input_pairs

# PyTorch's ReduceLROnPlateau defaults, as HAST constructs it (min_lr=1e-4, patience=50).
PLATEAU_FACTOR = 0.1
PLATEAU_PATIENCE = 50
PLATEAU_THRESHOLD = 1e-4
PLATEAU_MIN_LR = 1e-4
# A pool's own random stream, apart from the run's generator and student keys.
POOL_STREAM = 0x9001


@dataclasses.dataclass(frozen=True)
class PoolSpec:
    """The synthetic pool of a pool method (config section `pool`)."""
    size: int                # images in the pool
    batch_size: int          # images optimised together (their BN statistics are one batch's)
    steps: int               # Adam steps per batch
    lr: float                # Adam's initial learning rate
    focal: float             # beta: weight of the hard-sample term
    gamma: float             # its exponent
    train_batch_size: int    # the student's batch when it trains on the pool
    augment: str             # 'resized_crop_flip' (HAST, SynQ) or 'none'
    low_pass: float          # SynQ's low-pass filter D0 on each batch; 0: off (HAST)


def pool_loss(teacher: nn.Module, teacher_variables, x, y, focal: float, gamma: float):
    """(total, (bns, teacher accuracy)) of images `x` with labels `y`."""
    logits, col = teacher.apply(teacher_variables, x, mutable=['bn_inputs'])
    bns = losses.bns_loss(bn_input_pairs(col['bn_inputs'], teacher_variables['batch_stats']))
    log_p = jax.nn.log_softmax(logits, axis=-1)
    log_p_y = jnp.take_along_axis(log_p, y[:, None], axis=-1)[:, 0]
    hard = jnp.mean((1.0 - jnp.exp(log_p_y)) ** gamma * -log_p_y)
    return bns + focal * hard, (bns, jnp.mean(jnp.argmax(logits, -1) == y))


def _plateau(lr, best, bad, loss):
    """One step of ReduceLROnPlateau(mode='min', threshold_mode='rel', cooldown=0): the learning
    rate for the next step, and the updated best loss and count of steps without improvement."""
    better = loss < best * (1.0 - PLATEAU_THRESHOLD)
    best = jnp.where(better, loss, best)
    bad = jnp.where(better, 0, bad + 1)
    reduce = bad > PLATEAU_PATIENCE
    lr = jnp.where(reduce, jnp.maximum(lr * PLATEAU_FACTOR, PLATEAU_MIN_LR), lr)
    return lr, best, jnp.where(reduce, 0, bad)


def make_batch_step(teacher: nn.Module, spec: PoolSpec) -> tuple[Callable, optax.GradientTransformation]:
    """The Adam step of one pool batch, (carry, teacher_variables, y) -> (carry, metrics) with
    carry = (x, adam state, lr, best, bad), and the Adam transformation."""
    adam = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)

    def step(carry, teacher_variables, y):
        x, opt_state, lr, best, bad = carry
        (loss, (bns, acc)), grad = jax.value_and_grad(pool_loss, argnums=2, has_aux=True)(
            teacher, teacher_variables, x, y, spec.focal, spec.gamma)
        updates, opt_state = adam.update(grad, opt_state, x)
        x = x - lr * updates
        lr, best, bad = _plateau(lr, best, bad, loss)
        return (x, opt_state, lr, best, bad), {'loss': loss, 'bns': bns, 'teacher_acc': acc}

    return step, adam


def synthesize(teacher: nn.Module, teacher_variables, spec: PoolSpec, key: jax.Array, image_shape, num_classes: int,
               *, loop: str = 'python', log_prefix: str = 'pool') -> dict[str, np.ndarray]:
    """One run's pool: {'images': float32 (size, H, W, C), 'labels': int32 (size,)} on the host.

    `loop` 'python' calls the compiled step `steps` times (XLA:CPU runs convolutions inside loops
    far slower, bag_jax.layouts); 'scan' runs the steps of a batch as one program. A last batch
    smaller than `batch_size` is optimised at its own size (one more compilation)."""
    raw_step, adam = make_batch_step(teacher, spec)
    step = jax.jit(raw_step, donate_argnums=(0,))
    scanned = jax.jit(lambda carry, v, y: jax.lax.scan(lambda c, _: raw_step(c, v, y), carry, None, length=spec.steps),
                      donate_argnums=(0,))
    images, labels = [], []
    starts = range(0, spec.size, spec.batch_size)
    for i, start in enumerate(starts):
        n = min(spec.batch_size, spec.size - start)
        x_key, y_key = jax.random.split(jax.random.fold_in(key, i))
        x = jax.random.normal(x_key, (n, *image_shape))
        y = jax.random.randint(y_key, (n,), 0, num_classes)
        carry = (x, adam.init(x), jnp.float32(spec.lr), jnp.float32(jnp.inf), jnp.int32(0))
        if loop == 'scan':
            carry, metrics = scanned(carry, teacher_variables, y)
            last = jax.tree.map(lambda a: a[-1], metrics)
        else:
            for _ in range(spec.steps):
                carry, last = step(carry, teacher_variables, y)
        last = jax.device_get(last)
        logging.info('%s: batch %d of %d optimised (%d steps): loss %.4f, BNS %.4f, teacher accuracy %.3f, lr %.2g',
                     log_prefix, i + 1, len(starts), spec.steps, last['loss'], last['bns'], last['teacher_acc'],
                     float(carry[2]))
        images.append(np.asarray(carry[0]))
        labels.append(np.asarray(y))
    return {'images': np.concatenate(images).astype(np.float32), 'labels': np.concatenate(labels).astype(np.int32)}


def placeholder(spec: PoolSpec, image_shape) -> dict[str, jax.Array]:
    """Zeros of a pool's shapes: the state's slot before the pool is made (and the restore target)."""
    return {'images': jnp.zeros((spec.size, *image_shape), jnp.float32),
            'labels': jnp.zeros((spec.size,), jnp.int32)}


def run_key(seed: int) -> jax.Array:
    """The key of the pool of the run with `seed`."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), POOL_STREAM)


def sample_batch(pool: dict[str, jax.Array], key: jax.Array, spec: PoolSpec):
    """A training batch from the pool: `train_batch_size` distinct images drawn uniformly (HAST's
    loader reshuffles every pass instead; batches here are independent draws), augmented, then
    low-pass filtered where `spec.low_pass` > 0 (SynQ filters each loaded batch). Returns (x, y)."""
    from bag_jax import data
    pick_key, aug_key = jax.random.split(key)
    idx = jax.random.choice(pick_key, pool['labels'].shape[0], (spec.train_batch_size,), replace=False)
    x = data.augment(aug_key, pool['images'][idx], spec.augment)
    if spec.low_pass > 0:
        x = data.low_pass_filter(x, spec.low_pass)
    return x, pool['labels'][idx]

"""What a method is: the two losses of the generic iteration (bag_jax.step.train_iteration).

One iteration computes, once, the generated batch x = G(z, y), the teacher's logits t and BN
statistics loss on it and (where the method's generator loss reads it) the fake-quantized
student's logits s; the generator's gradient is assembled from those forwards' VJPs. The method
only says what its two losses are in terms of them.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Optional

import jax

if TYPE_CHECKING:
    from bag_jax.settings import Hypers


@dataclasses.dataclass(frozen=True)
class Forwards:
    """One iteration's shared forwards on the generated batch."""
    labels: jax.Array                  # y (B,), the classes the generator was asked for
    teacher_logits: jax.Array          # t (B, classes)
    bns: jax.Array                     # the BN-statistics loss of the teacher on x (docs/algorithms.md 4.1)
    student_logits: Optional[jax.Array] = None   # s (B, classes); None unless `generator_sees_student`


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    # L_G(forwards, hypers): differentiated with respect to t, bns and (if it reads it) s.
    generator_loss: Callable[[Forwards, 'Hypers'], jax.Array]
    # L_Q(student_logits, forwards, hypers): the student's loss before the channel-attention term,
    # which the iteration adds for every method where loss.channel_attention > 0 (BAG's).
    student_loss: Callable[[jax.Array, Forwards, 'Hypers'], jax.Array]
    generator_sees_student: bool       # L_G reads s, so G's gradient flows through the quantized student
    hypers: tuple[str, ...]            # the Hypers fields its two losses read (settings.Hypers)
    # 'generator': the student trains on the generator's batches; 'pool': on the synthetic pool
    # (bag_jax.pool) once calibration ends, the generator serving calibration only.
    data: str = 'generator'

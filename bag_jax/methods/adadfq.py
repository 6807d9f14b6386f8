"""AdaDFQ (Qian et al., CVPR 2023; docs/algorithms.md 4.3, 6.2).

    L_G = margin(H'; lambda_l, lambda_u) + balance (alpha_ds CE(t - s, y) + alpha_as CE(t + s, y))
          + bns * BNS
    L_Q = -T^2 mean_b H(softmax((t_b - s_b) / T))

H' is the normalized entropy of the teacher/student disagreement: the generator keeps each
sample's adaptability to the student between lambda_l and lambda_u, so its gradient flows through
the fake-quantized student. Preset (configs/base.py): batch 16, bns 1, T 20.
"""

from bag_jax import losses
from bag_jax.methods.base import Forwards, Method


def generator_loss(f: Forwards, h):
    return losses.adadfq_generator_loss(f.teacher_logits, f.student_logits, f.labels, f.bns, lambda_l=h.lambda_l,
                                        lambda_u=h.lambda_u, alpha_ds=h.alpha_ds, alpha_as=h.alpha_as,
                                        balance=h.balance, bns_weight=h.bns)


def student_loss(s, f: Forwards, h):
    return losses.adadfq_student_loss(s, f.teacher_logits, h.temperature)


METHOD = Method(name='adadfq', generator_loss=generator_loss, student_loss=student_loss,
                generator_sees_student=True,
                hypers=('lambda_l', 'lambda_u', 'alpha_ds', 'alpha_as', 'balance', 'bns', 'temperature'))

"""GDFQ (Xu et al., ECCV 2020; docs/algorithms.md 4.2, 6.1).

    L_G = CE(t, y) + bns * BNS               the generator makes images the teacher labels y
    L_Q = CE(s, y) + kd * T^2 KL(t/T || s/T)  the student fits the labels and the teacher

The generator does not see the student. Preset (configs/base.py): batch 200, bns 0.1, T 20.
"""

from bag_jax import losses
from bag_jax.methods.base import Forwards, Method


def generator_loss(f: Forwards, h):
    return losses.gdfq_generator_loss(f.teacher_logits, f.labels, f.bns, h.bns)


def student_loss(s, f: Forwards, h):
    return losses.gdfq_student_loss(s, f.teacher_logits, f.labels, h.temperature, h.kd)


METHOD = Method(name='gdfq', generator_loss=generator_loss, student_loss=student_loss,
                generator_sees_student=False, hypers=('bns', 'temperature', 'kd'))

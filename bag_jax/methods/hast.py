"""HAST (Li et al., CVPR 2023), as its code runs it (docs/algorithms.md 10.1):

  calibration  the first calibration_epochs train a GDFQ generator (L_G = CE(t, y) + 0.1 BNS,
               batch 16) while the student only runs forward, so its activation ranges settle;
               the student does not step (warmup_epochs = calibration_epochs);
  pool         a fixed pool of images optimised from noise on the teacher's BN statistics plus a
               focal hard-sample term (bag_jax.pool), made once before training;
  fine-tuning  the student trains on pool batches (random resized crop and flip):
                   L_Q = alpha T^2 KL_batchmean(t/T || s/T) + lambda sum_l mean_bc (A_s - A_t)^2
               (A: each residual unit's L2-normalized channel energy, loss.channel_attention =
               lambda = 1000, form 'energy_mean', layers 'branch'), plus the same loss again on
               x + eps sign(grad_x L_Q) (loss.perturbation = 1, loss.perturbation_eps = 0.01).

The perturbation and feature alignment are the iteration's generic student terms
(bag_jax.step), so they also run on a generator's batches (bag_synq).
"""

from bag_jax import losses
from bag_jax.methods import gdfq
from bag_jax.methods.base import Forwards, Method


def student_loss(s, f: Forwards, h):
    return losses.batchmean_kd_loss(s, f.teacher_logits, h.temperature, h.kd)


METHOD = Method(name='hast', generator_loss=gdfq.generator_loss, student_loss=student_loss,
                generator_sees_student=False, data='pool',
                hypers=('bns', 'temperature', 'kd', 'channel_attention', 'perturbation', 'perturbation_eps'))

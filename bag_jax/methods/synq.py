"""SynQ (Kim et al., ICLR 2025), as its code runs it (docs/algorithms.md 10.2): HAST's pipeline
(bag_jax.methods.hast) with

  - a Gaussian low-pass filter on every pool batch (pool.low_pass = D0, 80 by default);
  - Grad-CAM alignment on the last convolution, lambda_CAM MSE(map_T, map_S) on the clean batch
    (loss.cam: 200 on CIFAR, 50 on ImageNet);
  - cross-entropy with the pool's labels where the teacher is confident, p_t(y) > 1 - tau
    (loss.selce = lambda_CE, 5 on CIFAR and 0.5 on ImageNet; loss.selce_tau = tau = 0.5), in
    the clean and the perturbed loss, with the clean batch's mask;
  - the perturbed loss without feature alignment on CIFAR (loss.perturbation_features=False),
    with it on ImageNet.
The student loss is HAST's; the terms above are the iteration's generic ones (bag_jax.step).
"""

import dataclasses

from bag_jax.methods import hast

METHOD = dataclasses.replace(hast.METHOD, name='synq',
                             hypers=hast.METHOD.hypers + ('selce', 'selce_tau', 'cam'))

"""BAG with SynQ's and HAST's student terms on the generator's batches (this project's
combination, docs/algorithms.md 10.3): BAG's generator game is unchanged (AdaDFQ's losses, the
bit-width aware generator, channel-attention distillation); the student's loss gains selective
cross-entropy with the generator's labels, Grad-CAM alignment and the sign-gradient perturbation
term, each switched by its own weight (loss.selce, loss.cam, loss.perturbation), and the
activation ranges are clipped by the L_p search when calibration ends (range_clip).
The preset's values are in configs/base.py.
"""

import dataclasses

from bag_jax.methods import bag

METHOD = dataclasses.replace(bag.METHOD, name='bag_synq',
                             hypers=bag.METHOD.hypers + ('selce', 'selce_tau', 'cam', 'perturbation',
                                                         'perturbation_eps'))

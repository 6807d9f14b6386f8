"""The tiny digits run of the tests, as a config file that run.py also takes:

    python run.py --config=tests/tiny_config.py[:METHOD] --workdir=W

Depth-8 teacher trained for 2 epochs, then 2 epochs of 2 iterations at batch 8: small enough for
CI, on any device count that divides 8.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import base  # noqa: E402


def get_config(method: str = 'bag'):
    c = base.get_config(method)
    c.data.name = 'digits'
    c.teacher.depth = 8
    c.teacher.epochs = 2
    c.teacher.batch_size = 64
    c.teacher.lr = 0.05
    c.batch_size = 8
    c.epochs = 2
    c.iters_per_epoch = 2
    c.warmup_epochs = 1
    c.calibration_epochs = 1
    c.lr_milestones = (1,)
    c.generator.latent_dim = 16
    c.eval_batch_size = 200
    c.image_grid_every = 1
    return c

"""The data-free quantization methods, one module each, over one generic iteration
(bag_jax.step.train_iteration):

    gdfq.py     GDFQ (ECCV 2020): the generator fits the teacher; the student distills it
    adadfq.py   AdaDFQ (CVPR 2023): the generator keeps the student's disagreement adaptive
    bag.py      BAG (JKSCI 2024): AdaDFQ with a generator quantized at the student's bits and
                channel-attention distillation
    hast.py     HAST (CVPR 2023): the student learns from a fixed pool of noise optimised on the
                teacher (bag_jax.pool), with feature alignment and a sign-gradient perturbation
    synq.py     SynQ (ICLR 2025): HAST plus a low-pass filter, Grad-CAM alignment and selective
                cross-entropy
    bag_synq.py BAG with SynQ's student terms on its generator's batches (this project's combination)

Each module defines METHOD (a `bag_jax.methods.base.Method`): its generator loss, its student
loss and the hyperparameters they read. `config.method` names one; configs/base.py holds each
method's preset of defaults. A new method is a new module here and its name in METHODS.

This file imports nothing heavy, so that configs can read METHODS without JAX.
"""

import importlib

METHODS = ('gdfq', 'adadfq', 'bag', 'hast', 'synq', 'bag_synq')
# The methods whose student trains on a synthetic pool (bag_jax.pool) after calibration.
POOL_METHODS = ('hast', 'synq')


def get(name: str):
    """The Method of `name` (one of METHODS)."""
    if name not in METHODS:
        raise ValueError(f'method={name!r} is not allowed: choose one of {", ".join(map(repr, METHODS))}.')
    return importlib.import_module(f'{__name__}.{name}').METHOD

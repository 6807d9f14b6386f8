"""Writes tests/fixtures/dfq_one_step.npz: one DFQ iteration of the calibration phase and one of
fine-tuning (`tests/trajectories.dfq_one_step`) for GDFQ, AdaDFQ and BAG, on one device, from a
random depth-8 CIFAR-ResNet teacher on 8x8x1 images (no data, no training, so only float rounding
depends on the CPU).

It was run once, at commit 4bfc205, before the phases got programs of their own (issue 13):
tests/test_dfq.py checks that today's step gives those results, to rounding.

    JAX_PLATFORMS=cpu python tests/make_dfq_step_fixture.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bag_jax import bench, data, parallel, settings, step  # noqa: E402
from tests import tiny_config, trajectories  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'dfq_one_step.npz')
# Left out to keep the file small (5 of its 6.5 MB): the generator's gradient reaches its first
# layer through these two kernels, so `l1`'s gradient still checks the path through them.
LEFT_OUT = ('generator_gradient/conv1/kernel', 'generator_gradient/conv2/kernel')
METHODS = ('gdfq', 'adadfq', 'bag')
INFO = data.DatasetInfo(name='digits', num_classes=10, image_shape=(8, 8, 1), mean=(0.3,), std=(0.4,), augment='none')


def setup_for(method: str):
    """The tiny config's setup for `method` around the random teacher; (setup, teacher variables)."""
    c = tiny_config.get_config(method)
    model, variables = bench.random_teacher(INFO, {'arch': 'resnet_cifar', 'depth': 8, 'num_classes': 10}, seed=0)
    return step.build_setup(settings.parse(c).dfq, model, INFO), jax.tree.map(np.asarray, variables)


def one_steps() -> dict[str, np.ndarray]:
    mesh = parallel.make_mesh(jax.devices()[:1])
    out = {}
    for method in METHODS:
        setup, variables = setup_for(method)
        out.update({f'{method}/{k}': v for k, v in trajectories.dfq_one_step(setup, variables, mesh).items()
                    if not k.endswith(LEFT_OUT)})
    return out


if __name__ == '__main__':
    np.savez_compressed(OUT, **one_steps())
    print('wrote', OUT)

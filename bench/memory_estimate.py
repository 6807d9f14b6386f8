"""The memory of one training iteration against `dfq.warn_about_memory`'s estimate.

    JAX_PLATFORMS=cpu python bench/memory_estimate.py SIZE BATCH

Writes a 4-image SIZE x SIZE RGB npz dataset to /tmp, times one AdaDFQ iteration with a random
ResNet-20 teacher (`bag_jax.bench`), and prints one JSON line: this process's peak RSS and the
estimate. Run each size in its own process (peak RSS only grows).
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(size: int, batch: int) -> None:
    import numpy as np

    from bag_jax import bench, dfq, settings, step
    from configs import base

    path = f'/tmp/bag_jax_memory_{size}.npz'
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (4, size, size, 3), np.uint8), y_train=np.arange(4) % 2,
             x_test=rng.integers(0, 256, (2, size, size, 3), np.uint8), y_test=np.arange(2) % 2)
    c = base.get_config('adadfq')
    c.data.name, c.data.npz_path, c.batch_size = 'npz', path, batch
    experiment = settings.parse(c)
    result = bench.run_bench(experiment, steps=1, repeats=1)
    info = bench.bench_info(experiment.data)
    teacher_model = bench.random_teacher(info, bench.teacher_architecture(experiment.teacher, info), c.seed)[0]
    setup = step.build_setup(experiment.dfq, teacher_model, info)
    large = dfq.LARGE_IMAGE_PIXELS
    dfq.LARGE_IMAGE_PIXELS = 0      # estimate every size, not only those that warn
    estimate = dfq.warn_about_memory(setup, info)
    dfq.LARGE_IMAGE_PIXELS = large
    print(json.dumps({'size': size, 'batch': batch, 'peak_rss_mb': round(result['peak_rss_mb']),
                      'estimate_mb': round(estimate / 2**20),
                      'estimate_over_measured': round(estimate / 2**20 / result['peak_rss_mb'], 3)}))


if __name__ == '__main__':
    main(int(sys.argv[1]), int(sys.argv[2]))

"""The accelerator check: the real BAG W3A3 CIFAR-100 step at batch 16 and 200, one seed and
eight, with the projected wall time of a full 400-epoch x 200-iteration run.

    python bench/accelerator_check.py [--steps=50] [--repeats=3] [--method=bag]

Needs no data (random teacher). Prints one line per setting as it finishes, then a Markdown table.
The projection counts training steps only (not the 400 test-set evaluations or compilation).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from bag_jax import bench  # noqa: E402
from configs import cifar100_w3a3  # noqa: E402

_STEPS = flags.DEFINE_integer('steps', 50, 'Iterations per timed call.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls.')
_METHOD = flags.DEFINE_string('method', 'bag', 'gdfq, adadfq or bag.')
SETTINGS = [(16, 1), (16, 8), (200, 1), (200, 8)]


def main(argv):
    rows = []
    for batch, seeds in SETTINGS:
        c = cifar100_w3a3.get_config(_METHOD.value)
        c.batch_size, c.num_seeds = batch, seeds
        r = bench.run_bench(c, _STEPS.value, _REPEATS.value)
        iterations = c.epochs * c.iters_per_epoch    # run_bench leaves the config as it was
        r['projected_full_run_min'] = r['step_s_median'] * iterations / 60
        print(r, flush=True)
        rows.append(r)
    print(f'\n{rows[0]["device_kind"]} x {rows[0]["device_count"]}, {_METHOD.value} W3A3, ResNet-20 / CIFAR-100 shapes\n')
    print('| batch | seeds | s / iteration | images / s | device peak memory | full run (epochs x iters_per_epoch, all seeds) |')
    print('| --- | --- | --- | --- | --- | --- |')
    for r in rows:
        mem = f'{r["device_peak_bytes"] / 2**30:.2f} GiB' if r['device_peak_bytes'] else 'n/a'
        print(f'| {r["batch_size"]} | {r["num_seeds"]} | {r["step_s_median"]:.4f} | {r["images_per_s"]:.0f} | {mem} | '
              f'{r["projected_full_run_min"]:.1f} min |')


if __name__ == '__main__':
    app.run(main)

"""The cost of one fine-tuning iteration of each method preset, against bag's, on this machine.

    python bench/preset_cost.py [--config configs/cifar100_w3a3.py] [--steps 10] [--repeats 3]
        [--methods gdfq,bag,...]

Each preset of bag_jax.methods.METHODS (the config file's `get_config(PRESET)`, no data needed:
a random teacher of the config's architecture) is timed by `bag_jax.bench.run_bench`: the
calibration and fine-tuning programs compiled untimed, then `repeats` fine-tuning epochs of
`steps` iterations (the pool methods' pool is the zeros of its shape: its making is a one-off cost
before training, not an iteration's). Prints a Markdown table: the student's images per
iteration (a pool method's pool batch, else the generator's batch), the median seconds per
iteration and its ratio to bag's, and the compile time; the last line is the JSON of all rows.
"""

import argparse
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bag_jax import bench, methods, settings  # noqa: E402


def preset_config(path: str, preset: str):
    spec = importlib.util.spec_from_file_location('preset_config', os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', default='configs/cifar100_w3a3.py')
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--methods', default=','.join(methods.METHODS))
    args = parser.parse_args(argv)
    rows = []
    for preset in args.methods.split(','):
        experiment = settings.parse(preset_config(args.config, preset))
        result = bench.run_bench(experiment, args.steps, args.repeats)
        dfq = experiment.dfq
        images = dfq.pool.train_batch_size if dfq.pool is not None else dfq.schedule.batch_size
        rows.append({'preset': preset, 'student_images': images, 'step_s': result['step_s_median'],
                     'compile_s': result['compile_s'], 'device_kind': result['device_kind']})
        print(f'{preset}: {result["step_s_median"]:.4f} s per iteration', file=sys.stderr, flush=True)
    bag = next((r['step_s'] for r in rows if r['preset'] == 'bag'), None)
    print(f'{args.config}, {rows[0]["device_kind"]}, median of {args.repeats} epochs of {args.steps} iterations\n')
    print('| preset | student images per iteration | s per iteration | x bag | compile s |')
    print('| --- | --- | --- | --- | --- |')
    for r in rows:
        ratio = f'{r["step_s"] / bag:.2f}' if bag else ''
        print(f'| {r["preset"]} | {r["student_images"]} | {r["step_s"]:.4f} | {ratio} | {r["compile_s"]:.0f} |')
    print(json.dumps(rows))
    return 0


if __name__ == '__main__':
    sys.exit(main())

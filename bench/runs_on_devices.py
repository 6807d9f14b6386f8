"""Several runs in one program against the same runs one after the other, on N CPU devices.

    python bench/runs_on_devices.py [--devices=4] [--config=configs/cifar100_w3a3.py:adadfq]
        [--batch_size=16] [--steps=20] [--repeats=5] [--rounds=2]

Each setting is one `python -m bag_jax.bench` process on `--devices` emulated CPU devices
(`--xla_force_host_platform_device_count`), run one after another and repeated `--rounds`
times, alternating, so that every setting sees the same minutes of the machine:

  1 run                  num_seeds=1: one run data-parallel over all devices (what "one after
                         the other" repeats)
  1 run on 1 device      the same process with a single CPU device (a plain CPU run: XLA uses
                         every core inside each operation)
  K runs, K x D/K mesh   num_seeds=K: the runs spread over the devices first (bag_jax.sweep)
  K runs sharing         num_seeds=K, data_parallel=all devices: one mesh row, the runs one
                         after the other inside each iteration (the CPU path before the 2-D mesh)

Prints a Markdown table of seconds per iteration per run (the median over rounds of each round's
median) and each setting's ratio to the 1-run figure; XLA's FLOPs per iteration and the achieved
FLOP/s come from the same runs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEVICES = flags.DEFINE_integer('devices', 4, 'Emulated CPU devices.')
_CONFIG = flags.DEFINE_string('config', 'configs/cifar100_w3a3.py:adadfq', 'The config (file[:method]).')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Batch per run.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Iterations per timed call.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per setting and round.')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Rounds over all settings.')


def settings(devices: int) -> list[tuple[str, int, int | None, int]]:
    """(label, runs, data_parallel, devices) for 1, 2, 4, ..., `devices` runs."""
    out = [('1 run', 1, None, devices), ('1 run on 1 device', 1, None, 1)]
    runs = 2
    while runs <= devices:
        out.append((f'{runs} runs, {runs} x {devices // runs} mesh', runs, None, devices))
        runs *= 2
    out.append((f'{devices} runs sharing {devices} devices', devices, devices, devices))
    return out


def bench_once(runs: int, data_parallel: int | None, devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') +
                          f' --xla_force_host_platform_device_count={devices}').strip())
    command = [sys.executable, '-m', 'bag_jax.bench', f'--config={_CONFIG.value}', f'--config.batch_size={_BATCH.value}',
               f'--config.num_seeds={runs}', f'--steps={_STEPS.value}', f'--repeats={_REPEATS.value}']
    if data_parallel is not None:
        command.append(f'--config.data_parallel={data_parallel}')
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f'{" ".join(command)} failed:\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
    table = settings(_DEVICES.value)
    results = {label: [] for label, *_ in table}
    for round_index in range(_ROUNDS.value):
        for label, runs, data_parallel, devices in table:
            r = bench_once(runs, data_parallel, devices)
            results[label].append(r)
            print(f'round {round_index + 1} {label}: {r["step_s_per_run"]:.4f} s / iteration / run, '
                  f'{r["flops_per_s"] / 1e9:.2f} GFLOP/s', file=sys.stderr, flush=True)
    first = results[table[0][0]][0]
    print(f'\n{_CONFIG.value}, batch {_BATCH.value} per run, {_DEVICES.value} CPU devices '
          f'({first["device_kind"]}), {_ROUNDS.value} rounds\n')
    print('| setting | mesh (runs x data) | s / iteration / run | vs 1 run | GFLOP / iteration (all runs) | GFLOP/s |')
    print('| --- | --- | --- | --- | --- | --- |')
    alone = statistics.median(r['step_s_per_run'] for r in results[table[0][0]])
    for label, *_ in table:
        rs = results[label]
        per_run = statistics.median(r['step_s_per_run'] for r in rs)
        print(f'| {label} | {rs[0]["mesh_runs"]} x {rs[0]["mesh_data"]} | {per_run:.4f} | {per_run / alone:.2f} | '
              f'{rs[0]["flops_per_iteration"] / 1e9:.2f} | {statistics.median(r["flops_per_s"] for r in rs) / 1e9:.2f} |')


if __name__ == '__main__':
    app.run(main)

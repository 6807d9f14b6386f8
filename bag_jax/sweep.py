"""Many runs in one program: seeds and hyperparameter sweeps, and how they share the devices.

`config.sweep` maps dotted config fields to tuples of values; with `config.num_seeds = S` a run
trains every point of the product of the sweep values with each of the S seeds (seed .. seed +
S - 1), K runs in all, as one program: each run is a generator/student pair of its own, and the
swept values are per-run traced numbers, so one compilation serves the whole sweep
(`settings.SWEEPABLE` lists the fields that can be swept: those that change no shape and no
program; bag_jax.settings reads and checks config.sweep and makes the runs).

The devices form a 2-D mesh ('runs', 'data'): `config.data_parallel` devices train each run (its
batch split over 'data'), and the K runs spread over the 'runs' axis (`device_split`).

    python run.py --config=configs/cifar100_w3a3.py --workdir=W \\
        '--config.sweep={"loss.channel_attention": [0, 1, 5, 20]}' --config.num_seeds=2
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import numpy as np

@dataclasses.dataclass(frozen=True)
class Run:
    """One generator/student pair of a program: its sweep values and its seed."""
    overrides: tuple[tuple[str, float], ...]   # ((field, value), ...) in the order of config.sweep
    seed: int

    @property
    def point(self) -> str:
        """The sweep point, 'field=value,field=value' ('' without a sweep)."""
        return ','.join(f'{field}={_format(value)}' for field, value in self.overrides)

    @property
    def name(self) -> str:
        """'loss.channel_attention=5_seed0': the run's student directory under students/."""
        return f'{self.point}_seed{self.seed}' if self.overrides else f'seed{self.seed}'


def _format(value: float) -> str:
    return f'{value:g}'


def device_split(batch: int, data_parallel, num_runs: int, device_count: int) -> tuple[int, int]:
    """(runs axis, data axis) of the mesh: `data_parallel` devices per run (config.data_parallel),
    or by default all devices when there is one run, else as few as the batch needs so that the
    runs spread over the devices first. Raises ValueError naming the field to change when the
    split does not fit (K runs, the batch, or the devices not divisible)."""
    chosen = data_parallel
    # The devices per run that fit: they divide the devices and the batch, and the rows of the
    # mesh (device_count / d) divide the runs.
    fits = [d for d in range(1, device_count + 1)
            if device_count % d == 0 and batch % d == 0 and num_runs % (device_count // d) == 0]
    if chosen is None:
        if num_runs == 1:
            chosen = device_count
        elif not fits:
            raise ValueError(
                f'{num_runs} runs (sweep points x num_seeds) at batch_size={batch} do not split over {device_count} '
                'devices: the devices per run must divide batch_size and the device count, and the runs must fill '
                f'the other devices evenly. Make the run count a multiple of {device_count // math.gcd(device_count, batch)}, '
                f'or batch_size a multiple of {device_count} (each run on all devices, one after the other).')
        else:
            chosen = min(fits)
    if not isinstance(chosen, numbers.Integral) or isinstance(chosen, bool) or chosen < 1:
        raise ValueError(f'data_parallel={chosen!r} is not allowed: use a number of devices per run that divides '
                         f'the {device_count} devices, or leave it unset.')
    alternatives = f'use data_parallel in {fits}' if fits else 'change num_seeds, the sweep or batch_size'
    if device_count % chosen:
        raise ValueError(f'data_parallel={chosen} does not divide the {device_count} devices: {alternatives}.')
    if batch % chosen:
        per_run = 'devices' if data_parallel is None else 'devices per run (data_parallel)'
        raise ValueError(f'batch_size={batch} does not split over {chosen} {per_run}: use a multiple of {chosen}.')
    runs_axis = device_count // chosen
    if num_runs % runs_axis:
        raise ValueError(f'{num_runs} run(s) do not spread evenly over {runs_axis} groups of data_parallel={chosen} '
                         f'devices ({device_count} devices): {alternatives}, or make the run count (sweep points x '
                         f'num_seeds) a multiple of {runs_axis}.')
    return runs_axis, chosen


def mean_std(values: list[float]) -> dict[str, float]:
    """{'mean', 'std'} (sample std, ddof 1; 0 for one value)."""
    arr = np.asarray(values, np.float64)
    return {'mean': float(arr.mean()), 'std': float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}


def run_results(runs: list[Run], history_top1, ptq_top1, diverged=None, ptq_epoch: int = 0) -> list[dict[str, Any]]:
    """summary.json's `runs`: for each run its name, overrides, seed, ptq_top1, best_top1,
    best_epoch (1-based), last_top1 and diverged_epoch, from the per-epoch accuracies
    history_top1[epoch][run] (%) and the epoch (1-based) in which each run's losses stopped being
    finite (`diverged`, None for a run that did not). A diverged run's best counts the epochs
    before that one, and it has no last_top1 (nor a ptq_top1 if it diverged by `ptq_epoch`, the
    epoch after which ptq_top1 was measured)."""
    top1 = np.asarray(history_top1, np.float64)     # (epochs, K)
    diverged = [None] * len(runs) if diverged is None else diverged
    results = []
    for k, run in enumerate(runs):
        good = top1[:, k] if diverged[k] is None else top1[:diverged[k] - 1, k]
        best = int(good.argmax()) if len(good) else None
        results.append({
            'name': run.name, 'overrides': dict(run.overrides), 'seed': run.seed,
            'ptq_top1': None if ptq_top1 is None or (diverged[k] is not None and diverged[k] <= ptq_epoch)
            else ptq_top1[k],
            'best_top1': None if best is None else float(good[best]), 'best_epoch': None if best is None else best + 1,
            'last_top1': float(top1[-1, k]) if diverged[k] is None else None, 'diverged_epoch': diverged[k]})
    return results


def groups_of(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """summary.json's `groups`: for each sweep point (in order), its seeds, how many of its runs
    diverged, and the mean and std of ptq_top1, best_top1, best_epoch and last_top1 over the
    runs that have the value (a diverged run has no last_top1)."""
    points: dict[tuple, list[dict]] = {}
    for r in results:
        points.setdefault(tuple(r['overrides'].items()), []).append(r)
    groups = []
    for overrides, members in points.items():
        group = {'overrides': dict(overrides), 'seeds': [r['seed'] for r in members],
                 'diverged': sum(r.get('diverged_epoch') is not None for r in members)}
        for key in ('ptq_top1', 'best_top1', 'best_epoch', 'last_top1'):
            values = [r[key] for r in members if r[key] is not None]
            group[key] = mean_std(values) if values else None
        groups.append(group)
    return groups


def markdown_table(groups: list[dict[str, Any]]) -> str:
    """The groups as a Markdown table: one row per sweep point, accuracies as mean ± std over
    its seeds (%); a `diverged` column ("1 of 2") when some run's losses stopped being finite
    (its accuracies count the epochs before, and its last_top1 none)."""
    fields = list(groups[0]['overrides']) if groups else []
    cell = lambda s, digits=2: 'n/a' if s is None else (
        f'{s["mean"]:.{digits}f} ± {s["std"]:.{digits}f}' if s['std'] else f'{s["mean"]:.{digits}f}')
    diverged = any(g.get('diverged') for g in groups)
    header = [*fields, 'seeds', 'ptq_top1', 'best_top1', 'best_epoch', 'last_top1'] + (['diverged'] if diverged else [])
    lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
    for g in groups:
        row = [_format(g['overrides'][f]) for f in fields] + [
            ', '.join(str(s) for s in g['seeds']), cell(g['ptq_top1']), cell(g['best_top1']),
            cell(g['best_epoch'], 1), cell(g['last_top1'])]
        if diverged:
            row.append(f'{g["diverged"]} of {len(g["seeds"])}')
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)

"""Many runs in one program: seeds and hyperparameter sweeps, and how they share the devices.

`config.sweep` maps dotted config fields to tuples of values; with `config.num_seeds = S` a run
trains every point of the product of the sweep values with each of the S seeds (seed .. seed +
S - 1), K runs in all, as one program: each run is a generator/student pair of its own, and the
swept values are per-run traced numbers, so one compilation serves the whole sweep (`SWEEPABLE`
lists the fields that can be swept: those that change no shape and no program).

The devices form a 2-D mesh ('runs', 'data'): `config.data_parallel` devices train each run (its
batch split over 'data'), and the K runs spread over the 'runs' axis (`device_split`).

    python run.py --config=configs/cifar100_w3a3.py --workdir=W \\
        '--config.sweep={"loss.channel_attention": [0, 1, 5, 20]}' --config.num_seeds=2
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from typing import Any

import numpy as np

# The float hyperparameters the training step reads: each can take a different value in every
# run of one program.
SWEEPABLE = (
    'loss.bns', 'loss.temperature', 'loss.kd', 'loss.alpha_ds', 'loss.alpha_as', 'loss.lambda_l', 'loss.lambda_u',
    'loss.balance', 'loss.channel_attention',
    'generator.lr', 'generator.b1', 'generator.b2',
    'student.lr', 'student.momentum', 'student.weight_decay',
    'lr_decay',
)


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


def config_value(config, field: str):
    """The value of dotted `field` in `config`."""
    node = config
    for part in field.split('.'):
        node = node[part]
    return node


def sweep_of(config) -> dict[str, tuple[float, ...]]:
    """config.sweep checked: {field: values} (empty without a sweep). Raises ValueError naming a
    field that cannot be swept (one that changes shapes or the program: bit-widths, method,
    batch size, depth, data), a value that is not a number, or an empty value list."""
    sweep = config.get('sweep')
    if sweep is None or (hasattr(sweep, '__len__') and len(sweep) == 0):
        return {}
    if not hasattr(sweep, 'items'):
        raise ValueError(f'sweep={sweep!r} is not allowed: use a dict of dotted config fields to lists of values, e.g. '
                         '--config.sweep=\'{"loss.channel_attention": [0, 5]}\'.')
    checked = {}
    for field, values in sweep.items():
        if field not in SWEEPABLE:
            known = '' if _has_field(config, field) else ' (there is no such config field)'
            raise ValueError(f'sweep field {field!r} cannot be swept{known}: a sweep varies only the float '
                             f'hyperparameters of the step, which change no shape and no program: {", ".join(SWEEPABLE)}. '
                             'Bit-widths, method, batch size, depth and data need runs of their own.')
        if isinstance(values, (str, bytes)) or not hasattr(values, '__len__') or not len(values):
            raise ValueError(f'sweep[{field!r}]={values!r} is not allowed: use a non-empty list of numbers.')
        if any(not isinstance(v, numbers.Real) or isinstance(v, bool) for v in values):
            raise ValueError(f'sweep[{field!r}]={list(values)!r} is not allowed: every value must be a number.')
        if len(set(values)) != len(values):
            raise ValueError(f'sweep[{field!r}]={list(values)!r} repeats a value: each sweep point once '
                             '(num_seeds repeats runs).')
        checked[field] = tuple(float(v) for v in values)
    return checked


def _has_field(config, field: str) -> bool:
    try:
        config_value(config, field)
        return True
    except (KeyError, AttributeError):
        return False


def runs_of(config) -> list[Run]:
    """The runs of `config`: every sweep point (product of the sweep values, in order) times the
    seeds config.seed .. config.seed + num_seeds - 1, seeds innermost."""
    sweep = sweep_of(config)
    points = itertools.product(*sweep.values()) if sweep else [()]
    return [Run(overrides=tuple(zip(sweep, values)), seed=config.seed + s)
            for values in points for s in range(config.num_seeds)]


def run_configs(config) -> list:
    """Each run as a config of its own (`--config.seed=s` with its overrides, no sweep): what
    the run trains as when it runs alone."""
    out = []
    for run in runs_of(config):
        c = config.copy_and_resolve_references()
        with c.unlocked():
            c.sweep = None
            c.num_seeds = 1
            c.seed = run.seed
            for field, value in run.overrides:
                *path, last = field.split('.')
                node = c
                for part in path:
                    node = node[part]
                node[last] = value
        out.append(c)
    return out


def hyperparameters(config) -> dict[str, np.ndarray]:
    """{field: float32 array (K,)} for the swept fields: the traced per-run values ({} without a
    sweep, so that a single run's program keeps every hyperparameter a constant)."""
    runs = runs_of(config)
    fields = list(sweep_of(config))
    return {field: np.asarray([dict(run.overrides)[field] for run in runs], np.float32) for field in fields}


def device_split(config, num_runs: int, device_count: int) -> tuple[int, int]:
    """(runs axis, data axis) of the mesh: `config.data_parallel` devices per run, or by default
    all devices when there is one run, else as few as the batch needs so that the runs spread
    over the devices first. Raises ValueError naming the field to change when the split does not
    fit (K runs, the batch, or the devices not divisible)."""
    batch = config.batch_size
    chosen = config.get('data_parallel')
    if chosen is None:
        if num_runs == 1:
            chosen = device_count
        else:
            fits = [d for d in range(1, device_count + 1)
                    if device_count % d == 0 and num_runs % (device_count // d) == 0 and batch % d == 0]
            if not fits:
                raise ValueError(
                    f'{num_runs} runs (sweep points x num_seeds) at batch_size={batch} do not split over '
                    f'{device_count} devices: the devices per run (data_parallel) must divide batch_size and the '
                    f'device count, and the runs must fill the rest evenly. Use num_seeds or sweep values that make '
                    f'the run count a multiple of {_runs_hint(device_count, batch)}, or set data_parallel.')
            chosen = min(fits)
    if not isinstance(chosen, numbers.Integral) or isinstance(chosen, bool) or chosen < 1:
        raise ValueError(f'data_parallel={chosen!r} is not allowed: use a number of devices per run that divides '
                         f'the {device_count} devices, or leave it unset.')
    if device_count % chosen:
        divisors = [d for d in range(1, device_count + 1) if device_count % d == 0]
        raise ValueError(f'data_parallel={chosen} does not divide the {device_count} devices: use one of {divisors}.')
    if batch % chosen:
        per_run = 'devices' if config.get('data_parallel') is None else 'devices per run (data_parallel)'
        raise ValueError(f'batch_size={batch} does not split over {chosen} {per_run}: use a multiple of {chosen}.')
    runs_axis = device_count // chosen
    if num_runs % runs_axis:
        raise ValueError(f'{num_runs} run(s) do not spread evenly over {runs_axis} groups of data_parallel={chosen} '
                         f'devices ({device_count} devices): use data_parallel={_per_run_hint(num_runs, device_count)}, '
                         f'or a run count (sweep points x num_seeds) that is a multiple of {runs_axis}.')
    return runs_axis, chosen


def _runs_hint(device_count: int, batch: int) -> int:
    return device_count // math.gcd(device_count, batch)


def _per_run_hint(num_runs: int, device_count: int) -> int:
    return device_count // math.gcd(num_runs, device_count)


def mean_std(values: list[float]) -> dict[str, float]:
    """{'mean', 'std'} (sample std, ddof 1; 0 for one value)."""
    arr = np.asarray(values, np.float64)
    return {'mean': float(arr.mean()), 'std': float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}


def run_results(runs: list[Run], history_top1, ptq_top1) -> list[dict[str, Any]]:
    """summary.json's `runs`: for each run its overrides, seed, ptq_top1, best_top1, best_epoch
    (1-based) and last_top1, from the per-epoch accuracies history_top1[epoch][run] (%)."""
    top1 = np.asarray(history_top1, np.float64)     # (epochs, K)
    best = top1.argmax(axis=0)
    return [{'name': run.name, 'overrides': dict(run.overrides), 'seed': run.seed,
             'ptq_top1': None if ptq_top1 is None else ptq_top1[k], 'best_top1': float(top1[best[k], k]),
             'best_epoch': int(best[k]) + 1, 'last_top1': float(top1[-1, k])} for k, run in enumerate(runs)]


def groups_of(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """summary.json's `groups`: for each sweep point (in order), the seeds and the mean and std
    over them of ptq_top1, best_top1, best_epoch and last_top1."""
    points: dict[tuple, list[dict]] = {}
    for r in results:
        points.setdefault(tuple(r['overrides'].items()), []).append(r)
    groups = []
    for overrides, members in points.items():
        group = {'overrides': dict(overrides), 'seeds': [r['seed'] for r in members]}
        for key in ('ptq_top1', 'best_top1', 'best_epoch', 'last_top1'):
            values = [r[key] for r in members]
            group[key] = None if any(v is None for v in values) else mean_std(values)
        groups.append(group)
    return groups


def markdown_table(groups: list[dict[str, Any]]) -> str:
    """The groups as a Markdown table: one row per sweep point, accuracies as mean ± std over
    its seeds (%)."""
    fields = list(groups[0]['overrides']) if groups else []
    cell = lambda s, digits=2: 'n/a' if s is None else (
        f'{s["mean"]:.{digits}f} ± {s["std"]:.{digits}f}' if s['std'] else f'{s["mean"]:.{digits}f}')
    header = [*fields, 'seeds', 'ptq_top1', 'best_top1', 'best_epoch', 'last_top1']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
    for g in groups:
        row = [_format(g['overrides'][f]) for f in fields] + [
            ', '.join(str(s) for s in g['seeds']), cell(g['ptq_top1']), cell(g['best_top1']),
            cell(g['best_epoch'], 1), cell(g['last_top1'])]
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)

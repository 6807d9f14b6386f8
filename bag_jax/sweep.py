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
import json
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
    batch size, depth, data, and every boolean field), a value that is not a finite number, or an
    empty value list.

    The sweep is a dict, or its JSON text: the command line's parser (Python literals) leaves
    `--config.sweep='{"generator.quantize": [true, false]}'` or `[0.1, NaN]` a string."""
    sweep = config.get('sweep')
    if isinstance(sweep, str):
        sweep = _parse_json(sweep)
    if sweep is None or (hasattr(sweep, '__len__') and len(sweep) == 0):
        return {}
    if not hasattr(sweep, 'items'):
        raise ValueError(f'sweep={sweep!r} is not allowed: use {_DICT_HINT}.')
    checked = {}
    for field, values in sweep.items():
        if field not in SWEEPABLE:
            raise ValueError(_unsweepable_message(config, field))
        if isinstance(values, (str, bytes)) or not hasattr(values, '__len__') or not len(values):
            raise ValueError(f'sweep[{field!r}]={values!r} is not allowed: use a non-empty list of numbers.')
        if any(isinstance(v, bool) for v in values):
            raise ValueError(f'sweep[{field!r}]={list(values)!r} is not allowed: every value must be a number '
                             f'(True and False are not; {field} is a float hyperparameter).')
        if any(not isinstance(v, numbers.Real) for v in values):
            raise ValueError(f'sweep[{field!r}]={list(values)!r} is not allowed: every value must be a number.')
        if any(not math.isfinite(v) for v in values):
            raise ValueError(f'sweep[{field!r}]={list(values)!r} is not allowed: every value must be a finite number '
                             '(nan, inf and -inf are refused).')
        if len(set(values)) != len(values):
            raise ValueError(f'sweep[{field!r}]={list(values)!r} repeats a value: each sweep point once '
                             '(num_seeds repeats runs).')
        checked[field] = tuple(float(v) for v in values)
    return checked


_DICT_HINT = ('a dict of dotted config fields to lists of values, e.g. '
              '--config.sweep=\'{"loss.channel_attention": [0, 5]}\'')


def _parse_json(text: str):
    """The sweep given as text: its JSON value (a dict, if it is right)."""
    try:
        return json.loads(text)
    except ValueError as e:
        raise ValueError(f'sweep={text!r} is not allowed: it is not a dict, and as JSON it does not parse ({e}): '
                         f'use {_DICT_HINT}.') from None


def _unsweepable_message(config, field: str) -> str:
    """Why `field` cannot be swept, and which fields can."""
    sweepable = (f'a sweep varies only the float hyperparameters of the step, which change no shape and no '
                 f'program: {", ".join(SWEEPABLE)}')
    if not _has_field(config, field):
        return f'sweep field {field!r} cannot be swept (there is no such config field): {sweepable}.'
    if isinstance(config_value(config, field), bool):
        return (f'sweep field {field!r} cannot be swept: it is a boolean field, and True/False switches a part of '
                f'the program on or off, which one compilation cannot serve; run each value as a run of its own '
                f'(--config.{field}=True, --config.{field}=False in separate workdirs). {sweepable[0].upper()}'
                f'{sweepable[1:]}.')
    return (f'sweep field {field!r} cannot be swept: {sweepable}. Bit-widths, method, batch size, depth and data '
            'need runs of their own.')


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
        per_run = 'devices' if config.get('data_parallel') is None else 'devices per run (data_parallel)'
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

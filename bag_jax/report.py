"""Prints a finished run's results as the Markdown table that a sweep prints when it ends.

    python -m bag_jax.report WORKDIR [WORKDIR ...]

One row per sweep point (one row for a single run or a run of several seeds): its swept values,
its seeds, and ptq_top1, best_top1, best_epoch and last_top1 as mean ± std over the seeds (%),
read from WORKDIR/summary.json.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from bag_jax import sweep


def groups(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The summary's `groups`; for a summary written before runs were grouped, its one group."""
    if 'groups' in summary:
        return summary['groups']
    per_seed = summary.get('per_seed')
    if per_seed is None:
        runs = [{'overrides': {}, 'seed': None, **{k: summary.get(k) for k in
                                                   ('ptq_top1', 'best_top1', 'best_epoch', 'last_top1')}}]
    else:
        runs = [{'overrides': {}, 'seed': seed, 'ptq_top1': None if per_seed['ptq_top1'] is None else per_seed['ptq_top1'][k],
                 **{key: per_seed[key][k] for key in ('best_top1', 'best_epoch', 'last_top1')}}
                for k, seed in enumerate(per_seed['seed'])]
    return sweep.groups_of(runs)


def format_summary(summary: dict[str, Any]) -> str:
    """A heading (method, bits, teacher, runs) and the groups table."""
    heading = (f'{summary["method"]} W{summary["w_bits"]}A{summary["a_bits"]}, teacher {summary["teacher_top1"]:.2f} %, '
               f'{summary.get("num_runs", 1)} run(s), {summary["epochs"]} epochs')
    return heading + '\n\n' + sweep.markdown_table(groups(summary))


def read_summary(workdir: str) -> dict[str, Any]:
    path = os.path.join(workdir, 'summary.json')
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} does not exist: a quantization run writes it when it finishes '
                                f'(python run.py --config=... --workdir={workdir}).')
    with open(path) as f:
        summary = json.load(f)
    if 'method' not in summary:
        raise ValueError(f'{path} is not the summary of a quantization run (it has no method: a teacher or '
                         'evaluate run?).')
    return summary


def main(argv: list[str]) -> int:
    if len(argv) < 2 or any(a.startswith('-') for a in argv[1:]):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        for workdir in argv[1:]:
            print(f'{workdir}: ' + format_summary(read_summary(workdir)) + '\n')
    except (FileNotFoundError, ValueError) as e:
        print(f'bag_jax.report: error: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))

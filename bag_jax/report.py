"""Prints a finished run's results as the Markdown table that a sweep prints when it ends; and
the tables that `evaluate` and teacher training print when they finish (`format_evaluation`,
`format_teacher`).

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


def format_summary(summary: dict[str, Any]) -> str:
    """A heading (method, bits, teacher, runs) and the groups table."""
    heading = (f'{summary["method"]} W{summary["w_bits"]}A{summary["a_bits"]}, teacher {summary["teacher_top1"]:.2f} %, '
               f'{summary["num_runs"]} run(s), {summary["epochs"]} epochs')
    return heading + '\n\n' + sweep.markdown_table(summary['groups'])


def format_evaluation(summary: dict[str, Any]) -> str:
    """The `evaluate` mode's result (its summary.json, with the checkpoint's `arch` if known) as a
    heading and a one-row table: the checkpoint, its model (kind, architecture), a student's bits,
    the dataset, the test images scored, top-1 and top-5 (%)."""
    return f'evaluated {summary["kind"]} {summary["checkpoint"]}\n\n' + _accuracy_table(summary)


def format_teacher(result: dict[str, Any]) -> str:
    """A finished teacher training (`checkpoint`: where the teacher was saved, `kind`, `arch`,
    `depth`, `epochs`, `dataset`, and the final epoch's `images`, `top1`, `top5`) as a heading and
    a one-row table of its final test accuracy."""
    return (f'teacher trained for {result["epochs"]} epoch(s), final test accuracy; saved to {result["checkpoint"]}'
            '\n\n' + _accuracy_table({**result, 'kind': 'teacher'}))


def _accuracy_table(summary: dict[str, Any]) -> str:
    student = summary.get('w_bits') is not None
    model = ' '.join(str(p) for p in (summary['kind'], summary.get('arch'),
                                      f'depth {summary["depth"]}' if summary.get('depth') else None) if p)
    header = ['checkpoint', 'model'] + (['bits'] if student else []) + ['dataset', 'images', 'top-1 %', 'top-5 %']
    row = [summary['checkpoint'], model] + ([f'W{summary["w_bits"]}A{summary["a_bits"]}'] if student else []) + [
        str(summary.get('dataset')), str(summary.get('images', 'n/a')), _percent(summary.get('top1')),
        _percent(summary.get('top5'))]
    return '\n'.join(['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header), '| ' + ' | '.join(row) + ' |'])


def _percent(value) -> str:
    if value is None:
        return 'n/a'
    if isinstance(value, (list, tuple)):
        return ', '.join(_percent(v) for v in value)
    return f'{value:.2f}'


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

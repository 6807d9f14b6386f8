"""Teacher checkpoints: a directory with the network's variables (orbax) and `teacher.json`.

`teacher.json` records everything a quantization run needs to use the teacher without being
told again: the architecture (depth), the class count, the input image shape and the input
normalization (dataset name, per-channel mean/std), plus where the weights came from.

    DIR/teacher.json
    DIR/variables/      orbax StandardCheckpointer: {'params': ..., 'batch_stats': ...}
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from bag_jax.models import ResNetCifar

TEACHER_META = 'teacher.json'
TEACHER_VARIABLES = 'variables'
META_KEYS = ('arch', 'depth', 'num_classes', 'data')
DATA_KEYS = ('name', 'num_classes', 'image_shape', 'mean', 'std')


def save_teacher(directory: str, variables: dict, meta: dict[str, Any]) -> None:
    """Writes a teacher checkpoint to `directory` (created; must not hold one already).

    `variables` is {'params', 'batch_stats'} of a full-precision `ResNetCifar`; `meta` needs
    META_KEYS, with `meta['data']` holding DATA_KEYS. Called by every process together.
    """
    missing = [k for k in META_KEYS if k not in meta] + [f'data.{k}' for k in DATA_KEYS if k not in meta.get('data', {})]
    if missing:
        raise ValueError(f'teacher metadata lacks {missing}; it needs {list(META_KEYS)} and data.{list(DATA_KEYS)}.')
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    state = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, TEACHER_VARIABLES), state)
    if jax.process_index() == 0:
        with open(os.path.join(directory, TEACHER_META), 'w') as f:
            json.dump(meta, f, indent=2, sort_keys=True)


def is_teacher_checkpoint(directory: str | None) -> bool:
    """True if `directory` holds a complete teacher checkpoint."""
    return bool(directory) and os.path.isfile(os.path.join(directory, TEACHER_META)) and os.path.isdir(
        os.path.join(directory, TEACHER_VARIABLES))


def load_teacher(directory: str, field: str = 'teacher.checkpoint') -> tuple[ResNetCifar, dict, dict[str, Any]]:
    """Reads a teacher checkpoint. Returns (model, variables, meta), variables as numpy arrays.

    A missing or incomplete directory raises FileNotFoundError saying how to make one.
    """
    if not is_teacher_checkpoint(directory):
        raise FileNotFoundError(
            f'{field}={directory!r} is not a teacher checkpoint (it needs {TEACHER_META} and {TEACHER_VARIABLES}/). '
            'Make one with `python -m bag_jax.convert --pytorchcv FILE.pth --out DIR` from pytorchcv weights, '
            'or with `python run.py --config=configs/cifar100_teacher.py --workdir=W` (it writes W/teacher), '
            f'or leave {field} empty to let a quantization run train its teacher first.')
    directory = os.path.abspath(directory)
    with open(os.path.join(directory, TEACHER_META)) as f:
        meta = json.load(f)
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(os.path.join(directory, TEACHER_VARIABLES))
    variables = jax.tree.map(np.asarray, {'params': state['params'], 'batch_stats': state['batch_stats']})
    model = ResNetCifar(num_classes=int(meta['num_classes']), depth=int(meta['depth']))
    return model, variables, meta

"""Model checkpoints: a directory with the network's variables (orbax) and a JSON description.

The JSON records everything needed to use the network without being told again: the
architecture (depth), the class count, the input image shape and the input normalization
(dataset name, per-channel mean/std), where the weights came from, and for a quantized student
its bit-widths.

    DIR/teacher.json    or DIR/student.json (adds 'quant': {w_bits, a_bits, range_rule, ste})
    DIR/variables/      orbax StandardCheckpointer: {'params', 'batch_stats'[, 'quant_stats']}

Training-state checkpoints (to resume a run) are separate: see `bag_jax.teacher`, `bag_jax.dfq`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from bag_jax.models import ResNetCifar

TEACHER_META = 'teacher.json'
STUDENT_META = 'student.json'
TEACHER_VARIABLES = 'variables'
_META_FILES = {'teacher': TEACHER_META, 'student': STUDENT_META}
META_KEYS = ('arch', 'depth', 'num_classes', 'data')
DATA_KEYS = ('name', 'num_classes', 'image_shape', 'mean', 'std')


def model_meta(info, depth: int, source: str, **extra) -> dict[str, Any]:
    """The JSON description of a ResNetCifar of `depth` for data described by `info` (a
    data.DatasetInfo); `extra` adds fields (accuracies, a student's 'quant')."""
    return {'arch': 'resnet_cifar', 'depth': depth, 'num_classes': info.num_classes, 'data': info.to_dict(),
            'source': source, **extra}


def save_teacher(directory: str, variables: dict, meta: dict[str, Any]) -> None:
    """Writes a teacher checkpoint to `directory` (created; must not hold one already).

    `variables` is {'params', 'batch_stats'} of a full-precision `ResNetCifar`; `meta` needs
    META_KEYS, with `meta['data']` holding DATA_KEYS. Called by every process together.
    """
    save_model(directory, variables, meta, 'teacher')


def save_model(directory: str, variables: dict, meta: dict[str, Any], kind: str) -> None:
    """Writes a 'teacher' or 'student' checkpoint (see the module docstring); all processes call it."""
    missing = [k for k in META_KEYS if k not in meta] + [f'data.{k}' for k in DATA_KEYS if k not in meta.get('data', {})]
    if missing:
        raise ValueError(f'teacher metadata lacks {missing}; it needs {list(META_KEYS)} and data.{list(DATA_KEYS)}.')
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    if kind == 'student' and 'quant' not in meta:
        raise ValueError("student metadata lacks 'quant' (w_bits, a_bits, range_rule, ste).")
    names = ('params', 'batch_stats', 'quant_stats') if kind == 'student' else ('params', 'batch_stats')
    state = {k: variables[k] for k in names if k in variables}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, TEACHER_VARIABLES), state)
    if jax.process_index() == 0:
        with open(os.path.join(directory, _META_FILES[kind]), 'w') as f:
            json.dump({**meta, 'kind': kind}, f, indent=2, sort_keys=True)
    if jax.process_count() > 1:
        # The JSON marks the checkpoint complete: no process may look for it (a quantization run
        # loads the teacher it has just trained) before process 0 has written it.
        multihost_utils.sync_global_devices(f'bag_jax.checkpoint.save_model {directory}')


def is_teacher_checkpoint(directory: str | None) -> bool:
    """True if `directory` holds a complete teacher checkpoint."""
    return is_model_checkpoint(directory, 'teacher')


def is_model_checkpoint(directory: str | None, kind: str) -> bool:
    """True if `directory` holds a complete checkpoint of `kind` ('teacher' or 'student')."""
    return bool(directory) and os.path.isfile(os.path.join(directory, _META_FILES[kind])) and os.path.isdir(
        os.path.join(directory, TEACHER_VARIABLES))


def load_teacher(directory: str, field: str = 'teacher.checkpoint') -> tuple[ResNetCifar, dict, dict[str, Any]]:
    """Reads a teacher checkpoint. Returns (model, variables, meta), variables as numpy arrays.

    A missing or incomplete directory raises FileNotFoundError saying how to make one.
    """
    kind, model, variables, meta = load_model(directory, field, kinds=('teacher',))
    return model, variables, meta


def load_model(directory: str, field: str = 'checkpoint', kinds: tuple[str, ...] = ('teacher', 'student')):
    """Reads a teacher or student checkpoint. Returns (kind, model, variables, meta).

    The model is the `ResNetCifar` the metadata describes (quantized for a student); variables
    are numpy arrays. A missing or incomplete directory raises FileNotFoundError.
    """
    kind = next((k for k in kinds if directory and os.path.isfile(os.path.join(directory, _META_FILES[k]))), None)
    if kind is None or not os.path.isdir(os.path.join(directory, TEACHER_VARIABLES)):
        raise FileNotFoundError(
            f'{field}={directory!r} is not a {" or ".join(kinds)} checkpoint (it needs '
            f'{" or ".join(_META_FILES[k] for k in kinds)} and {TEACHER_VARIABLES}/). '
            'Make one with `python -m bag_jax.convert --pytorchcv FILE.pth --out DIR` from pytorchcv weights, '
            'or with `python run.py --config=configs/cifar100_teacher.py --workdir=W` (it writes W/teacher); '
            'a quantization run writes its student to W/student. '
            'Leave teacher.checkpoint empty to let a quantization run train its teacher first.')
    directory = os.path.abspath(directory)
    with open(os.path.join(directory, _META_FILES[kind])) as f:
        meta = json.load(f)
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(os.path.join(directory, TEACHER_VARIABLES))
    variables = jax.tree.map(np.asarray, dict(state))
    q = meta.get('quant', {}) if kind == 'student' else {}
    model = ResNetCifar(num_classes=int(meta['num_classes']), depth=int(meta['depth']),
                        w_bits=q.get('w_bits'), a_bits=q.get('a_bits'),
                        range_rule=q.get('range_rule', 'reference'), ste=q.get('ste', 'identity'))
    return kind, model, variables, meta


def check_compatible(model_info, data_info, field: str) -> None:
    """Raises ValueError if a network made for `model_info` cannot take `data_info`'s images
    (a DatasetInfo each): different class counts or image shapes."""
    if model_info.num_classes != data_info.num_classes or tuple(model_info.image_shape) != tuple(data_info.image_shape):
        raise ValueError(
            f'{field} was made for {model_info.name!r} ({model_info.num_classes} classes, images '
            f'{tuple(model_info.image_shape)}), but data.name={data_info.name!r} has {data_info.num_classes} classes '
            f'and images {tuple(data_info.image_shape)}: use a checkpoint made for this data, or change data.name.')


class TrainingCheckpoints:
    """Per-epoch checkpoints of a training state, to resume an interrupted run exactly.

    Wraps an orbax CheckpointManager in `directory`: step = number of finished epochs, items
    'state' (any pytree of arrays) and 'meta' (JSON: best accuracies, history, ...). Keeps the
    newest `keep`. Every process calls every method together.
    """

    def __init__(self, directory: str, keep: int = 2):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def latest_epoch(self) -> int | None:
        """The number of epochs the newest checkpoint has finished, or None."""
        return self._manager.latest_step()

    def save(self, epoch: int, state, meta: dict[str, Any]) -> None:
        """Saves after `epoch` finished epochs (asynchronously; the device buffers are copied first)."""
        self._manager.save(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def restore(self, like) -> tuple[int, Any, dict[str, Any]] | None:
        """Restores the newest checkpoint into the structure, shapes and shardings of `like`.

        Returns (finished_epochs, state, meta), or None when there is no checkpoint.
        """
        epoch = self._manager.latest_step()
        if epoch is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self._manager.restore(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return epoch, restored['state'], restored['meta']

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

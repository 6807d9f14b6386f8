"""Model checkpoints: a directory with the network's variables (orbax) and a JSON description.

The JSON records everything needed to use the network without being told again: the
architecture (`arch` and its fields, e.g. `depth`; `models.describe`), the class count, the input image shape and the input normalization
(dataset name, per-channel mean/std), where the weights came from, and for a quantized student
its bit-widths.

    DIR/teacher.json    or DIR/student.json (adds 'quant': {w_bits, a_bits, range_rule, ste})
    DIR/variables/      orbax StandardCheckpointer: {'params', 'batch_stats'[, 'quant_stats']}

A model checkpoint is written whole into `DIR.partial/` and renamed to `DIR` only when complete,
so no interruption leaves a `DIR` that looks finished, or one that blocks the next save (a
leftover `DIR.partial/` is removed first). A checkpoint that cannot be read raises
`CheckpointError` naming the path.

Training-state checkpoints (to resume a run) are `TrainingCheckpoints`: per-epoch orbax steps,
used by `bag_jax.teacher` and `bag_jax.dfq`. A damaged newest step is set aside and the newest
step that restores is used instead.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from bag_jax import data, models
from bag_jax.quant import QuantSpec

TEACHER_META = 'teacher.json'
STUDENT_META = 'student.json'
VARIABLES = 'variables'
PARTIAL_SUFFIX = '.partial'      # a model checkpoint being written
DAMAGED_SUFFIX = '.damaged'      # a training step that could not be restored, set aside
_META_FILES = {'teacher': TEACHER_META, 'student': STUDENT_META}
META_KEYS = ('arch', 'num_classes', 'data')
DATA_KEYS = ('name', 'num_classes', 'image_shape', 'mean', 'std')


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be read (damaged, truncated, or written by something else)."""


def model_meta(info, model, source: str, data_config=None, **extra) -> dict[str, Any]:
    """The JSON description of the network `model` (its architecture, `models.describe`) for data
    described by `info` (a data.DatasetInfo); `extra` adds fields (accuracies, a student's 'quant').
    `data_config` (the run's `config.data`) is recorded as DATA_SOURCE (`data_record`): where the
    images the model was trained or quantized with came from, which evaluation and export use
    unless told otherwise (`data_config_for`)."""
    meta = {**models.describe(model), 'num_classes': info.num_classes, 'data': info.to_dict(), 'source': source}
    if data_config is not None:
        meta[DATA_SOURCE] = data_record(data_config)
    return {**meta, **extra}


# The config.data fields that say where each source's images are and how its test split is made
# (the data source registry's: bag_jax/data/sources.py).
DATA_SOURCE = 'data_source'
_SOURCE_FIELDS = {name: source.fields for name, source in data.REGISTRY.items()}
DATA_FIELDS = data.DATA_FIELDS
DATA_PATH_FIELDS = ('npz_path', 'tfds_dir', 'imagefolder_dir')


def data_record(data_config) -> dict[str, Any]:
    """What `model_meta` records of a run's `config.data`: the source's name and the fields that
    locate its images and make its test split (npz_path; tfds_dir; imagefolder_dir and
    image_size; digits_test_fraction), paths made absolute, an unset one as None."""
    get = data_config.get if hasattr(data_config, 'get') else lambda k, d=None: getattr(data_config, k, d)
    name = get('name')
    record = {'name': name}
    for field in _SOURCE_FIELDS.get(name, ()):
        value = get(field, None)
        if field in DATA_PATH_FIELDS and value is not None:
            value = os.path.abspath(os.fspath(value))
        elif field == 'digits_test_fraction' and value is None:
            value = 0.25        # data.load_dataset's default
        record[field] = value
    return record


def data_config_for(meta: dict[str, Any], overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """The data config (DATA_FIELDS) to score a checkpoint with, and which of its fields came from
    the checkpoint's DATA_SOURCE record.

    Every field of `overrides` (the user's flags or config.data) that is set wins. The others come
    from the record, unless `overrides` names another source; without a record (a checkpoint
    written before it was kept, a converted one) the source is the checkpoint's dataset and the
    other fields are unset (the loaders' defaults), as before. The image size defaults to the
    checkpoint's (ImageNet-style sources)."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None and k in DATA_FIELDS}
    record = meta.get(DATA_SOURCE) if isinstance(meta.get(DATA_SOURCE), dict) else None
    if record is not None and given.get('name', record.get('name')) != record.get('name'):
        record = None       # another source than the one recorded: nothing recorded applies
    recorded = {k: v for k, v in (record or {}).items() if k in DATA_FIELDS and v is not None}
    fields = {field: None for field in DATA_FIELDS}
    fields.update(name=meta['data']['name'], image_size=meta['data']['image_shape'][0])
    fields.update(recorded)
    fields.update(given)
    return fields, [k for k in recorded if k not in given and k != 'name']


def save_teacher(directory: str, variables: dict, meta: dict[str, Any]) -> None:
    """Writes a teacher checkpoint to `directory` (created; must not hold one already).

    `variables` is {'params', 'batch_stats'} of a full-precision network; `meta` needs
    META_KEYS, with `meta['data']` holding DATA_KEYS. Called by every process together.
    """
    save_model(directory, variables, meta, 'teacher')


def save_model(directory: str, variables: dict, meta: dict[str, Any], kind: str) -> None:
    """Writes a 'teacher' or 'student' checkpoint (see the module docstring), replacing one that
    is there; all processes call it together.

    Everything is written into `directory + '.partial'` first (a leftover one from an
    interrupted save is removed), and that is renamed to `directory` once complete.
    """
    missing = [k for k in META_KEYS if k not in meta] + [f'data.{k}' for k in DATA_KEYS if k not in meta.get('data', {})]
    if missing:
        raise ValueError(f'{kind} metadata lacks {missing}; it needs {list(META_KEYS)} and data.{list(DATA_KEYS)}.')
    if kind == 'student' and 'quant' not in meta:
        raise ValueError("student metadata lacks 'quant' (w_bits, a_bits, range_rule, ste).")
    directory = os.path.abspath(directory)
    partial = directory + PARTIAL_SUFFIX
    if jax.process_index() == 0 and os.path.exists(partial):
        shutil.rmtree(partial)
    _sync(f'bag_jax.checkpoint.save_model start {directory}')
    names = ('params', 'batch_stats', 'quant_stats') if kind == 'student' else ('params', 'batch_stats')
    state = {k: variables[k] for k in names if k in variables}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(partial, VARIABLES), state)
    if jax.process_index() == 0:
        with open(os.path.join(partial, _META_FILES[kind]), 'w') as f:
            json.dump({**meta, 'kind': kind}, f, indent=2, sort_keys=True)
        publish(partial, directory)
    # No process may look for the checkpoint (a quantization run loads the teacher it has just
    # trained) before process 0 has renamed it into place.
    _sync(f'bag_jax.checkpoint.save_model done {directory}')


def publish(partial: str, directory: str) -> None:
    """Renames the completely written directory `partial` to `directory` (a checkpoint, an
    export). Replacing a finished one (an extended run's student), there is for a moment no
    `directory`, never a half-written one."""
    if os.path.exists(directory):
        old = directory + '.replaced'
        shutil.rmtree(old, ignore_errors=True)
        os.rename(directory, old)
        os.rename(partial, directory)
        shutil.rmtree(old)
    else:
        os.rename(partial, directory)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def is_teacher_checkpoint(directory: str | None) -> bool:
    """True if `directory` holds a complete teacher checkpoint."""
    return is_model_checkpoint(directory, 'teacher')


def is_model_checkpoint(directory: str | None, kind: str) -> bool:
    """True if `directory` holds a complete checkpoint of `kind` ('teacher' or 'student')."""
    return bool(directory) and os.path.isfile(os.path.join(directory, _META_FILES[kind])) and os.path.isdir(
        os.path.join(directory, VARIABLES))


def load_teacher(directory: str, field: str = 'teacher.checkpoint') -> tuple[Any, dict, dict[str, Any]]:
    """Reads a teacher checkpoint. Returns (model, variables, meta), variables as numpy arrays.

    A missing or incomplete directory raises FileNotFoundError saying how to make one.
    """
    kind, model, variables, meta = load_model(directory, field, kinds=('teacher',))
    return model, variables, meta


def load_model(directory: str, field: str = 'checkpoint', kinds: tuple[str, ...] = ('teacher', 'student')):
    """Reads a teacher or student checkpoint. Returns (kind, model, variables, meta).

    The model is the network the metadata describes (`models.build`) (quantized for a student); variables
    are numpy arrays. A missing or incomplete directory raises FileNotFoundError; one that is
    there but cannot be read raises CheckpointError naming it.
    """
    kind = next((k for k in kinds if directory and os.path.isfile(os.path.join(directory, _META_FILES[k]))), None)
    if kind is None or not os.path.isdir(os.path.join(directory, VARIABLES)):
        raise FileNotFoundError(
            f'{field}={directory!r} is not a {" or ".join(kinds)} checkpoint (it needs '
            f'{" or ".join(_META_FILES[k] for k in kinds)} and {VARIABLES}/). '
            'Make one with `python -m bag_jax.convert --pytorchcv FILE.pth --out DIR` from pytorchcv weights, '
            'or with `python run.py --config=configs/cifar100_teacher.py --workdir=W` (it writes W/teacher); '
            'a quantization run writes its student to W/student. '
            'Leave teacher.checkpoint empty to let a quantization run train its teacher first.')
    directory = os.path.abspath(directory)
    meta_path = os.path.join(directory, _META_FILES[kind])
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        model = models.build(meta, QuantSpec(**meta.get('quant', {})) if kind == 'student' else None)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f'{field}={directory!r}: {meta_path} is damaged ({_reason(e)}); '
                              f'write the checkpoint again or use another one.') from None
    try:
        with _quiet_read_failures(), ocp.StandardCheckpointer() as checkpointer:
            state = checkpointer.restore(os.path.join(directory, VARIABLES))
    except Exception as e:   # orbax and tensorstore raise many kinds; all mean the same here
        raise CheckpointError(f'{field}={directory!r}: its variables in {os.path.join(directory, VARIABLES)} '
                              f'cannot be read ({_reason(e)}); write the checkpoint again or use another '
                              'one.') from None
    variables = jax.tree.map(np.asarray, dict(state))
    return kind, model, variables, meta


def _is_read_failure_echo(unraisable) -> bool:
    """True for what a failed orbax read leaves behind: orbax reads every array in its own
    coroutine, and when one fails the others are dropped unawaited (each reported with its
    TensorStore spec when collected), or complete into an event loop already closed."""
    coroutine_file = getattr(getattr(unraisable.object, 'cr_code', None), 'co_filename', '')
    closed_loop = isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == 'Event loop is closed'
    return closed_loop or f'{os.sep}orbax{os.sep}' in coroutine_file


@contextlib.contextmanager
def _quiet_read_failures():
    """Reports a failed checkpoint read once, by its exception, not once per array in flight.

    Inside, and after a read failed inside for the rest of the process, `sys.unraisablehook`
    drops the reports `_is_read_failure_echo` recognises (hundreds of tracebacks for a training
    state); everything else still reaches the previous hook.
    """
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_read_failure_echo(unraisable):
            previous(unraisable)
    sys.unraisablehook = hook
    try:
        yield
    except BaseException:
        gc.collect()      # the dropped coroutines report now, while the filter is in place
        raise
    sys.unraisablehook = previous


def _reason(error: BaseException) -> str:
    """The first line of an exception's message, shortened: orbax and tensorstore errors carry
    whole specs and tracebacks."""
    text = str(error).strip().splitlines()
    line = text[0].split(' See full TensorStore details')[0] if text else ''
    return f'{type(error).__name__}: {line[:200]}'.rstrip(': ')


def _shapes(tree) -> dict[str, tuple]:
    """{'a/b/0': shape} for every array in `tree` (arrays, or orbax's metadata of saved ones), its
    path spelled by key names as orbax records them, whatever the containers' types."""
    name = lambda k: str(next((getattr(k, a) for a in ('key', 'name', 'idx') if hasattr(k, a)), k))
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, 'shape'))[0]
    return {'/'.join(name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def _state_mismatch(state_dir: str, like) -> str | None:
    """How the arrays saved in `state_dir` (an orbax StandardSave item) differ from `like`'s in
    their paths or shapes, briefly; None when they do not, or when the checkpoint's description
    cannot be read (the checkpoint is damaged, not different)."""
    try:
        with _quiet_read_failures():
            saved = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir))
        saved, wanted = _shapes(getattr(saved, 'tree', saved)), _shapes(like)
    except Exception:   # orbax and tensorstore raise many kinds; all mean that it cannot be read
        return None
    if not saved or saved == wanted:
        return None
    listed = lambda keys: ', '.join(keys[:3]) + (', ...' if len(keys) > 3 else '')
    only_saved, only_wanted = sorted(saved.keys() - wanted.keys()), sorted(wanted.keys() - saved.keys())
    reshaped = [f'{k}: {saved[k]} saved, {wanted[k]} now' for k in sorted(saved.keys() & wanted.keys())
                if saved[k] != wanted[k]]
    return '; '.join(f'{len(keys)} {what} ({listed(keys)})' for keys, what in (
        (only_saved, 'array(s) only in the checkpoint'), (only_wanted, 'array(s) only in this run'),
        (reshaped, 'array(s) of another shape')) if keys)


def check_compatible(model_info, data_info, field: str) -> None:
    """Raises ValueError if a network made for `model_info` cannot take `data_info`'s images
    (a DatasetInfo each): different class counts or channel counts, or different image sizes
    unless the data are ImageNet-style ('imagenet2012', 'imagefolder'), whose crop size the user
    picks (data.image_size) for networks that pool globally."""
    model_shape, data_shape = tuple(model_info.image_shape), tuple(data_info.image_shape)
    free_size = data.crops_to_image_size(data_info.name)
    if (model_info.num_classes != data_info.num_classes or model_shape[-1] != data_shape[-1]
            or (not free_size and model_shape != data_shape)):
        raise ValueError(
            f'{field} was made for {model_info.name!r} ({model_info.num_classes} classes, images '
            f'{model_shape}), but data.name={data_info.name!r} has {data_info.num_classes} classes '
            f'and images {data_shape}: use a checkpoint made for this data, or change data.name.')


class TrainingCheckpoints:
    """Per-epoch checkpoints of a training state, to resume an interrupted run exactly.

    Wraps an orbax CheckpointManager in `directory`: step = number of finished epochs, items
    'state' (any pytree of arrays) and 'meta' (JSON: best accuracies, history, ...). Keeps the
    newest `keep`. Every process calls every method together.
    """

    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self._keep = keep
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        # Orbax writes a step into a temporary directory and renames it when complete; one left
        # by a killed run is removed here rather than tripping up a later save.
        options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True, cleanup_tmp_directories=True)
        return ocp.CheckpointManager(self.directory, options=options)

    def latest_epoch(self) -> int | None:
        """The number of epochs the newest checkpoint has finished, or None."""
        return self._manager.latest_step()

    def save(self, epoch: int, state, meta: dict[str, Any]) -> None:
        """Saves after `epoch` finished epochs (asynchronously; the device buffers are copied first)."""
        self._manager.save(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def restore(self, like) -> tuple[int, Any, dict[str, Any]] | None:
        """Restores the newest checkpoint that can be read into the structure, shapes and
        shardings of `like`.

        Returns (finished_epochs, state, meta), or None when there is no checkpoint. A step that
        cannot be restored (a truncated file, damaged metadata, an empty step directory) is
        logged with its path, renamed to `<step>.damaged` so that the run can save that step
        again, and the next older step is tried. Raises CheckpointError, saying what to delete,
        when there are steps and none restores; and, renaming nothing, when a step is intact but
        holds other arrays or shapes than `like` (made by another config or version of the code).
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        damaged = []
        for epoch in sorted(self._manager.all_steps(), reverse=True):
            try:
                with _quiet_read_failures():
                    restored = self._manager.restore(epoch, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
                if not isinstance(restored['meta'], dict):
                    raise ValueError(f'its meta item is {type(restored["meta"]).__name__}, not a dict')
            except Exception as e:   # orbax and tensorstore raise many kinds; all mean the same here
                path, reason = os.path.join(self.directory, str(epoch)), _reason(e)
                mismatch = _state_mismatch(os.path.join(path, 'state'), abstract)
                if mismatch:     # a valid step of another state: not damage, and no reason to delete it
                    raise CheckpointError(
                        f'The checkpoints in {self.directory} do not match this run\'s state: the one after epoch '
                        f'{epoch} has {mismatch}. They were made by another config or another version of bag_jax: '
                        'resume them with the config (and version) that made them, or give this run a new '
                        '--workdir.') from None
                logging.warning('The checkpoint after epoch %d in %s cannot be restored (%s).', epoch, path, reason)
                damaged.append((epoch, path, reason))
                continue
            if damaged:
                self._set_aside(damaged)
                logging.warning('Resuming from the checkpoint after epoch %d instead; the damaged one(s) were '
                                'renamed to %s.', epoch, ', '.join(p + DAMAGED_SUFFIX for _, p, _ in damaged))
            return epoch, restored['state'], restored['meta']
        if damaged:
            raise CheckpointError(
                f'No checkpoint in {self.directory} can be restored (epoch(s) '
                f'{", ".join(str(e) for e, _, _ in damaged)}; the newest: {damaged[0][2]}). Delete {self.directory} '
                'to train this phase again from its start, or start over with a new --workdir.')
        return None

    def _set_aside(self, damaged) -> None:
        """Renames damaged step directories out of orbax's way (process 0), then reopens the manager."""
        self._manager.close()
        if jax.process_index() == 0:
            for _, path, _ in damaged:
                target = path + DAMAGED_SUFFIX
                if os.path.exists(target):
                    target = f'{target}.{int(time.time())}'
                if os.path.exists(path):
                    os.rename(path, target)
        _sync(f'bag_jax.checkpoint.set_aside {self.directory}')
        self._manager = self._open()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

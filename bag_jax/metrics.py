"""Metrics out of a run: `workdir/metrics.jsonl`, TensorBoard event files, logs, image grids.

Only process 0 writes; the other processes get a writer that does nothing. TensorBoard files
are written with tensorboardX's record writer, which needs no TensorFlow.

What a run records survives `kill -9` at any moment:
  metrics.jsonl      the record of the scalars: one JSON line per write, appended in one call.
                     A line cut off by a kill (no newline at the end) is dropped by the reader
                     and cut from the file by the next writer.
  images/*.png       the record of the image grids, each renamed into place whole; the PNG
                     carries its step and labels (a text chunk).
  tensorboard/       a function of those two: it holds every jsonl line and every PNG once.
                     Its RECORD_FILE says what its event files were written from (the jsonl's
                     length and sha256, each PNG's size and mtime) and how long they were then;
                     it is rewritten (atomically) after each event is flushed. A writer that
                     finds it differing from the files (a kill between the jsonl append and the
                     event, in the event, before the record; lines dropped by `resume`) rebuilds
                     the directory from the record: into `tensorboard.tmp`, then renamed into
                     place, so that a kill in a rebuild leaves one to do again.
Tests: tests/test_drills.py kills a writer at each of its file operations and resumes.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import socket
import time
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging


GRID_CLASSES = 10     # rows of an image grid
MIN_CELL = 64         # an image of a readable grid is upscaled to at least this many pixels a side
METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
IMAGES_DIR = 'images'
RECORD_FILE = 'bag_jax_record.json'     # in TENSORBOARD_DIR: what its event files were written from
_PNG_KEY = 'bag_jax'                   # the PNG text chunk with an image's step and labels
_IMAGE_NAME = re.compile(r'epoch_(\d+)\.png$')


class MetricWriter:
    """Appends one JSON object per `write` to `workdir/metrics.jsonl` and mirrors the scalars to
    TensorBoard (`workdir/tensorboard`) and the log; `write_image` saves an image grid to
    `workdir/images` and TensorBoard. Use as a context manager or call close().

    `metrics.jsonl` and the PNGs are the record; the TensorBoard directory is rebuilt from them
    whenever it does not hold exactly what they hold (checked before the first write, on
    `resume` and on close), so that it holds each line once after any kill.
    """

    def __init__(self, workdir: str, *, enabled: bool | None = None):
        self.enabled = _process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._workdir = workdir
        self._tb_dir = os.path.join(workdir, TENSORBOARD_DIR)
        self._images_dir = os.path.join(workdir, IMAGES_DIR)
        self._tensorboard = _tensorboard_available()
        self._synced = False       # the TensorBoard directory checked against the record
        self._source = None        # what it holds: _source_of's dict, kept up to date by the writes
        self._sha = None           # sha256 of metrics.jsonl so far
        self._events = None        # the open event file (RecordWriter), once written to
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)

    # The record.

    def write(self, step: int, metrics: Mapping[str, Any], **labels: Any) -> None:
        """Records `metrics` (scalars) at `step`; `labels` (e.g. phase='teacher') go to the JSON
        line and prefix the TensorBoard tags."""
        if not self.enabled:
            return
        self._sync()
        line = json.dumps({'step': int(step), **labels, **{k: float(v) for k, v in metrics.items()}}) + '\n'
        self._append_line(line.encode())
        m = json.loads(line)      # TensorBoard gets what a rebuild reads back
        self._add_events([_scalar_event(m)])
        _, scalars = _split_line(m)
        # The console's line: each run's own values (`top1/<run>`) and the timing stay in the record.
        shown = ' '.join(f'{k} {v:.4g}' for k, v in scalars.items() if '/' not in k and k != 'epoch_s')
        seconds = f' ({scalars["epoch_s"]:.1f} s)' if 'epoch_s' in scalars else ''
        logging.info('%s epoch %d: %s%s', ' '.join(str(v) for v in labels.values()), step, shown, seconds)

    def write_image(self, step: int, grid: np.ndarray, **labels: Any) -> str:
        """Saves a uint8 (H, W, 3) grid as `workdir/images/epoch_{step:04d}.png` (renamed into
        place whole; its step and labels in a text chunk) and adds it to TensorBoard at `step`,
        tag '<label values>/images', as tensorboardX's add_image would; returns the PNG's path."""
        path = os.path.join(self._images_dir, f'epoch_{int(step):04d}.png')
        if not self.enabled:
            return path
        self._sync()
        from PIL import Image, PngImagePlugin
        info = PngImagePlugin.PngInfo()
        info.add_text(_PNG_KEY, json.dumps({'step': int(step), **{k: str(v) for k, v in labels.items()}}))
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(grid, np.uint8)).save(buffer, format='PNG', pnginfo=info)
        os.makedirs(self._images_dir, exist_ok=True)
        _write_atomically(path, buffer.getvalue())
        name = os.path.basename(path)
        if self._source is not None and name in self._source['images']:
            # TensorBoard holds this step's earlier image: write it again from the record.
            self._synced = False
            self._sync(rebuild=True)
        else:
            self._add_events([_image_event(path)], image=name)
        return path

    def resume(self, phase: str, step: int) -> None:
        """Forgets what was recorded for `phase` after `step`: the epochs that a run resumed
        from its checkpoint after `step` epochs does again. Drops those lines from
        metrics.jsonl (rewritten atomically) and those images, then brings TensorBoard in
        line with what remains (rebuilt when it differs)."""
        if not self.enabled:
            return
        lines = read_metrics(self._workdir)
        kept = [m for m in lines if not (m.get('phase') == phase and m['step'] > step)]
        if len(kept) != len(lines):
            logging.info('metrics.jsonl: dropping %d line(s) of %s after step %d, which this run does again',
                         len(lines) - len(kept), phase, step)
            _write_atomically(self.path, ''.join(json.dumps(m) + '\n' for m in kept).encode())
        for path in _image_files(self._images_dir):
            meta = _image_meta(path)
            if meta.get('phase') == phase and meta['step'] > step:
                os.remove(path)
        self._synced = False
        self._sync()

    def close(self) -> None:
        if self.enabled:
            self._sync()     # an opened and closed writer still leaves TensorBoard consistent
        self._close_events()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:       # left as it is: the next writer brings TensorBoard in line
            self._close_events()

    # TensorBoard, a function of the record.

    def _sync(self, rebuild: bool = False) -> None:
        """Makes the TensorBoard directory hold exactly metrics.jsonl and the PNGs, rebuilding
        it when its RECORD_FILE says it was written from anything else (or when told to)."""
        if self._synced:
            return
        self._close_events()
        _remove(self.path + '.tmp', self._tb_dir + '.tmp', self._tb_dir + '.old',
                *_leftover_images(self._images_dir))
        _cut_torn_line(self.path)
        source, self._sha = _source_of(self.path, self._images_dir)
        if self._tensorboard:
            # Its event files as the record left them: an event written after it (a kill before
            # the record caught up) makes a file longer than the record says.
            held = {**source, 'events': _event_sizes(self._tb_dir)}
            if rebuild or _read_json(os.path.join(self._tb_dir, RECORD_FILE)) != held:
                self._rebuild(source)
            self._source = source
        self._synced = True

    def _rebuild(self, source: dict[str, Any]) -> None:
        if os.path.exists(self._tb_dir) or os.path.exists(self.path):     # not a new workdir's first start
            logging.info('%s: rebuilding from %s and %s/, which it does not match', self._tb_dir, METRICS_FILE,
                         IMAGES_DIR)
        tmp, old = self._tb_dir + '.tmp', self._tb_dir + '.old'
        _remove(tmp)
        os.makedirs(tmp)
        events = _open_event_file(tmp)
        for m in read_metrics(self._workdir):
            events.write(_scalar_event(m).SerializeToString())
        for name in sorted(source['images'], key=_image_step):
            events.write(_image_event(os.path.join(self._images_dir, name)).SerializeToString())
        events.flush()
        events.close()
        _write_record(tmp, source)
        if os.path.exists(self._tb_dir):
            os.rename(self._tb_dir, old)
        os.rename(tmp, self._tb_dir)
        _remove(old)

    def _append_line(self, line: bytes) -> None:
        """Appends one line to metrics.jsonl in one write."""
        with open(self.path, 'ab') as f:
            f.write(line)
        self._sha.update(line)
        if self._source is not None:
            self._source['jsonl_bytes'] += len(line)
            self._source['jsonl_sha256'] = self._sha.hexdigest()

    def _add_events(self, events: Sequence[Any], image: str | None = None) -> None:
        """Appends events to the TensorBoard directory, flushes them, then records that it holds
        them (the record last: a kill before it leaves a record that differs, so a rebuild)."""
        if not self._tensorboard:
            return
        if self._events is None:
            self._events = _open_event_file(self._tb_dir)
        for event in events:
            self._events.write(event.SerializeToString())
        self._events.flush()
        if image is not None:
            self._source['images'][image] = _image_stamp(os.path.join(self._images_dir, image))
        _write_record(self._tb_dir, self._source)

    def _close_events(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None


def _process_index() -> int:
    import jax     # here, so that a process that only writes metrics starts fast (tests/test_drills.py)
    return jax.process_index()


def _tensorboard_available() -> bool:
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        logging.warning('tensorboardX is not installed: no TensorBoard files, metrics.jsonl only.')
        return False
    return True


def _open_event_file(directory: str):
    """A new event file in `directory`, named to sort after the ones there (TensorBoard reads a
    directory's event files in name order), its file-version event written."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import RecordWriter
    os.makedirs(directory, exist_ok=True)
    taken = [int(m.group(1)) for m in map(re.compile(r'events\.out\.tfevents\.(\d+)\.').match, os.listdir(directory))
             if m]
    index = max([int(time.time()), *(t + 1 for t in taken)])
    events = RecordWriter(os.path.join(directory, f'events.out.tfevents.{index:010d}.{socket.gethostname()}'))
    events.write(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2').SerializeToString())
    return events


def _event_sizes(directory: str) -> dict[str, int]:
    """The length of each event file in `directory`."""
    if not os.path.isdir(directory):
        return {}
    return {n: os.path.getsize(os.path.join(directory, n)) for n in sorted(os.listdir(directory))
            if n.startswith('events.out.tfevents.')}


def _write_record(directory: str, source: Mapping[str, Any]) -> None:
    """Records in `directory` that its event files, as long as they are now, hold `source`."""
    _write_atomically(os.path.join(directory, RECORD_FILE),
                      json.dumps({**source, 'events': _event_sizes(directory)}).encode())


def _split_line(m: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, float]]:
    """A metrics.jsonl line's labels (its strings) and scalars (the rest but the step)."""
    labels = {k: v for k, v in m.items() if isinstance(v, str)}
    return labels, {k: v for k, v in m.items() if k != 'step' and not isinstance(v, str)}


def _scalar_event(m: Mapping[str, Any]):
    """One TensorBoard event with all the scalars of a metrics.jsonl line, tagged
    '<label values>/<name>'."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.proto.summary_pb2 import Summary
    labels, scalars = _split_line(m)
    prefix = '/'.join(labels.values())
    values = [Summary.Value(tag=f'{prefix}/{k}' if prefix else k, simple_value=float(v)) for k, v in scalars.items()]
    return event_pb2.Event(wall_time=time.time(), step=int(m['step']), summary=Summary(value=values))


def _image_event(path: str):
    """The TensorBoard event of a grid PNG written by `write_image`: its bytes as they are (what
    tensorboardX's add_image writes, without encoding again)."""
    from PIL import Image
    from tensorboardX.proto import event_pb2
    from tensorboardX.proto.summary_pb2 import Summary
    with open(path, 'rb') as f:
        png = f.read()
    meta = _image_meta(path)
    with Image.open(io.BytesIO(png)) as im:
        width, height = im.size
    labels = [v for k, v in meta.items() if k != 'step']
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=png)
    summary = Summary(value=[Summary.Value(tag='/'.join([*labels, 'images']), image=image)])
    return event_pb2.Event(wall_time=time.time(), step=meta['step'], summary=summary)


def _image_files(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    return [os.path.join(directory, n) for n in sorted(os.listdir(directory)) if _IMAGE_NAME.match(n)]


def _leftover_images(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    return [os.path.join(directory, n) for n in os.listdir(directory) if n.endswith('.tmp')]


def _image_step(name: str) -> int:
    return int(_IMAGE_NAME.match(name).group(1))


def _image_meta(path: str) -> dict[str, Any]:
    """The step and labels a grid PNG was written with (its step from the name, for a PNG of an
    older version)."""
    from PIL import Image
    with Image.open(path) as im:
        text = im.info.get(_PNG_KEY)
    meta = json.loads(text) if text else {}
    return {**meta, 'step': int(meta.get('step', _image_step(os.path.basename(path))))}


def _image_stamp(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _source_of(jsonl: str, images_dir: str) -> tuple[dict[str, Any], Any]:
    """What the TensorBoard directory must be written from: the jsonl's length and sha256, each
    PNG's size and mtime. Also the sha256 object, to go on with."""
    data = b''
    if os.path.exists(jsonl):
        with open(jsonl, 'rb') as f:
            data = f.read()
    sha = hashlib.sha256(data)
    images = {os.path.basename(p): _image_stamp(p) for p in _image_files(images_dir)}
    return {'jsonl_bytes': len(data), 'jsonl_sha256': sha.hexdigest(), 'images': images}, sha


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_atomically(path: str, data: bytes) -> None:
    with open(path + '.tmp', 'wb') as f:
        f.write(data)
    os.replace(path + '.tmp', path)


def _remove(*paths: str) -> None:
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _complete_lines(data: bytes, where: str) -> tuple[list[dict[str, Any]], int]:
    """The lines of a metrics.jsonl and the length of the part they fill. A last line cut off by
    a kill (no newline, or not JSON) is left out; an unreadable line before it is an error."""
    lines, end = [], 0
    while end < len(data):
        newline = data.find(b'\n', end)
        if newline < 0:
            break           # cut off mid-write
        text = data[end:newline].strip()
        if text:
            try:
                lines.append(json.loads(text))
            except ValueError as e:
                if data[newline + 1:].strip():
                    number = data[:end].count(b'\n') + 1
                    raise ValueError(f'{where}: line {number} is not JSON ({e}): {text[:80]!r}') from e
                break       # the last line, garbled by a crash
        end = newline + 1
    return lines, end


def _cut_torn_line(path: str) -> None:
    """Cuts metrics.jsonl after its last complete line (see _complete_lines)."""
    if not os.path.exists(path):
        return
    with open(path, 'rb') as f:
        data = f.read()
    _, end = _complete_lines(data, path)
    if end < len(data):
        logging.warning('%s: dropping its last line, cut off by a crash: %r', path, data[end:end + 80])
        os.truncate(path, end)


def write_summary(workdir: str, summary: Mapping[str, Any]) -> None:
    """Writes `workdir/summary.json` (process 0 only)."""
    if _process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, 'summary.json'), 'w') as f:
            json.dump(summary, f, indent=2)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The lines of `workdir/metrics.jsonl` as dicts (empty if there is none), without a last
    line cut off by a crash."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path, 'rb') as f:
        return _complete_lines(f.read(), path)[0]


def __getattr__(name: str):
    # CIFAR10_CLASSES and CIFAR100_CLASSES, once defined here, live with their source
    # (bag_jax/data/tfds_cifar.py), read when asked for so that this module imports no JAX.
    if name in ('CIFAR10_CLASSES', 'CIFAR100_CLASSES'):
        from bag_jax.data import tfds_cifar
        return getattr(tfds_cifar, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def class_names(info) -> tuple[str, ...] | None:
    """The class names of a data.DatasetInfo's source, in label order, where it has them: the
    digits, CIFAR's, ImageNet's WordNet ids (also of an image folder of ImageNet classes); None
    for the others (the data source registry's `data.class_names`)."""
    from bag_jax import data
    return data.class_names(info)


def row_labels(num_classes: int, names: Sequence[str] | None = None, rows: int = GRID_CLASSES) -> list[str]:
    """The labels of an image grid's rows: '<class>: <name>' (the class alone where there is no
    name, or where the name is the number)."""
    labels = []
    for i in range(min(num_classes, rows)):
        name = names[i] if names is not None else str(i)
        labels.append(str(i) if name == str(i) else f'{i}: {name[:24]}')
    return labels


def image_grid(images: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int = 4) -> np.ndarray:
    """Arranges generated images (N, H, W, C), any range, in a uint8 grid: one row per class (the
    first GRID_CLASSES classes), up to `per_class` samples each; each image min-max scaled.
    Returns (rows*(H+1), cols*(W+1), 3) uint8: `readable_grid` makes it one to show."""
    images = np.asarray(images, np.float32)
    n, h, w, c = images.shape
    classes = list(range(min(num_classes, GRID_CLASSES)))
    grid = np.zeros((len(classes) * (h + 1), per_class * (w + 1), 3), np.uint8)
    for row, cls in enumerate(classes):
        for col, idx in enumerate(np.flatnonzero(np.asarray(labels) == cls)[:per_class]):
            img = images[idx]
            img = (img - img.min()) / max(float(img.max() - img.min()), 1e-8)
            img = np.repeat(img, 3, axis=-1) if c == 1 else img[..., :3]
            grid[row * (h + 1):row * (h + 1) + h, col * (w + 1):col * (w + 1) + w] = (img * 255).round().astype(np.uint8)
    return grid


GRID_GAP = 2              # pixels between the cells of a readable grid
GRID_BACKGROUND = 32      # its gray, behind the cells and the labels
GRID_TEXT = 255


def readable_grid(grid: np.ndarray, image_hw: tuple[int, int], labels: Sequence[str],
                  min_cell: int = MIN_CELL) -> np.ndarray:
    """`image_grid`'s grid of (H, W) images made for a person: each image upscaled (nearest
    neighbour, a whole factor) to at least `min_cell` pixels a side, each row labelled on the
    left with `labels[row]` in Pillow's default font. Returns (rows*(H'+gap), margin +
    cols*(W'+gap), 3) uint8."""
    from PIL import Image, ImageDraw, ImageFont
    h, w = image_hw
    rows, cols = grid.shape[0] // (h + 1), grid.shape[1] // (w + 1)
    if len(labels) < rows:
        raise ValueError(f'readable_grid: {len(labels)} labels for {rows} rows')
    scale = max(1, math.ceil(min_cell / min(h, w)))
    cells = grid.reshape(rows, h + 1, cols, w + 1, 3)[:, :h, :, :w]
    cells = cells.repeat(scale, axis=1).repeat(scale, axis=3)
    ch, cw = h * scale + GRID_GAP, w * scale + GRID_GAP
    cells = np.pad(cells, ((0, 0), (0, GRID_GAP), (0, 0), (0, GRID_GAP), (0, 0)), constant_values=GRID_BACKGROUND)
    try:
        font = ImageFont.load_default(size=min(max(11, ch // 6), 32))
    except TypeError:      # a Pillow without FreeType sizes
        font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new('L', (1, 1)))
    boxes = [measure.textbbox((0, 0), text, font=font) for text in labels[:rows]]
    pad = 6
    margin = max(b[2] for b in boxes) + 2 * pad
    out = np.full((rows * ch, margin + cols * cw, 3), GRID_BACKGROUND, np.uint8)
    out[:, margin:] = cells.reshape(rows * ch, cols * cw, 3)
    image = Image.fromarray(out)
    draw = ImageDraw.Draw(image)
    for row, (text, box) in enumerate(zip(labels, boxes)):
        top = row * ch + (ch - GRID_GAP - (box[3] - box[1])) // 2 - box[1]
        draw.text((pad, top), text, fill=(GRID_TEXT,) * 3, font=font)
    return np.asarray(image)

"""Metrics out of a run: `workdir/metrics.jsonl`, TensorBoard event files, logs, image grids.

Only process 0 writes; the other processes get a writer that does nothing. TensorBoard files
come from tensorboardX, which needs no TensorFlow.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging


GRID_CLASSES = 10     # rows of an image grid


class MetricWriter:
    """Appends one JSON object per `write` to `workdir/metrics.jsonl` and mirrors the scalars to
    TensorBoard (`workdir/tensorboard`) and the log. Use as a context manager or call close().

    `metrics.jsonl` is the record; the TensorBoard files are rebuilt from it when `resume` drops
    the lines of epochs that a resumed run does again.
    """

    def __init__(self, workdir: str, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, 'metrics.jsonl')
        self._tb_dir = os.path.join(workdir, 'tensorboard')
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._tb = self._open_tensorboard()

    def _open_tensorboard(self):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            logging.warning('tensorboardX is not installed: no TensorBoard files, metrics.jsonl only.')
            return None
        return SummaryWriter(self._tb_dir)

    def write(self, step: int, metrics: Mapping[str, Any], **labels: Any) -> None:
        """Records `metrics` (scalars) at `step`; `labels` (e.g. phase='teacher') go to the JSON
        line and prefix the TensorBoard tags."""
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in metrics.items()}
        with open(self.path, 'a') as f:
            f.write(json.dumps({'step': int(step), **labels, **scalars}) + '\n')
        self._write_tensorboard(step, scalars, labels)
        if self._tb is not None:
            self._tb.flush()
        logging.info('step %d %s: %s', step, ' '.join(f'{k}={v}' for k, v in labels.items()),
                     ', '.join(f'{k}={v:.5g}' for k, v in scalars.items()))

    def _write_tensorboard(self, step: int, scalars: Mapping[str, float], labels: Mapping[str, Any]) -> None:
        if self._tb is not None:
            prefix = '/'.join(str(v) for v in labels.values())
            for k, v in scalars.items():
                self._tb.add_scalar(f'{prefix}/{k}' if prefix else k, v, int(step))

    def resume(self, phase: str, step: int) -> None:
        """Forgets what was recorded for `phase` after `step`: the epochs that a run resumed
        from its checkpoint after `step` epochs does again. Drops those lines from
        metrics.jsonl (rewritten atomically) and, when any were dropped, rebuilds the
        TensorBoard files from the lines that remain."""
        if not self.enabled:
            return
        lines = read_metrics(os.path.dirname(self.path))
        kept = [m for m in lines if not (m.get('phase') == phase and m['step'] > step)]
        if len(kept) == len(lines):
            return
        logging.info('metrics.jsonl: dropping %d line(s) of %s after step %d, which this run does again',
                     len(lines) - len(kept), phase, step)
        with open(self.path + '.tmp', 'w') as f:
            f.writelines(json.dumps(m) + '\n' for m in kept)
        os.replace(self.path + '.tmp', self.path)
        if self._tb is not None:
            self._tb.close()
            shutil.rmtree(self._tb_dir, ignore_errors=True)
            self._tb = self._open_tensorboard()
            for m in kept:
                labels = {k: v for k, v in m.items() if isinstance(v, str)}
                scalars = {k: v for k, v in m.items() if k != 'step' and not isinstance(v, str)}
                self._write_tensorboard(m['step'], scalars, labels)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_summary(workdir: str, summary: Mapping[str, Any]) -> None:
    """Writes `workdir/summary.json` (process 0 only)."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, 'summary.json'), 'w') as f:
            json.dump(summary, f, indent=2)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The lines of `workdir/metrics.jsonl` as dicts (empty if there is none)."""
    path = os.path.join(workdir, 'metrics.jsonl')
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def image_grid(images: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int = 4) -> np.ndarray:
    """Arranges generated images (N, H, W, C), any range, in a uint8 grid: one row per class (the
    first GRID_CLASSES classes), up to `per_class` samples each; each image min-max scaled.
    Returns (rows*H', cols*W', 3) uint8."""
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


def save_png(path: str, array: np.ndarray, scale: int | None = None) -> None:
    """Writes a uint8 (H, W, 3) array as a PNG, upscaled so small images stay visible."""
    from PIL import Image
    scale = scale or max(1, math.ceil(256 / max(array.shape[:2])))
    Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST).save(path)

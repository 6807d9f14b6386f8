"""Metrics out of a run: `workdir/metrics.jsonl`, TensorBoard event files, logs, image grids.

Only process 0 writes; the other processes get a writer that does nothing. TensorBoard files
come from tensorboardX, which needs no TensorFlow.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging


class MetricWriter:
    """Appends one JSON object per `write` to `workdir/metrics.jsonl` and mirrors the scalars to
    TensorBoard (`workdir/tensorboard`) and the log. Use as a context manager or call close()."""

    def __init__(self, workdir: str, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, 'metrics.jsonl')
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
            except ImportError:
                logging.warning('tensorboardX is not installed: no TensorBoard files, metrics.jsonl only.')

    def write(self, step: int, metrics: Mapping[str, Any], **labels: Any) -> None:
        """Records `metrics` (scalars) at `step`; `labels` (e.g. phase='teacher') go to the JSON line only."""
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in metrics.items()}
        with open(self.path, 'a') as f:
            f.write(json.dumps({'step': int(step), **labels, **scalars}) + '\n')
        if self._tb is not None:
            prefix = '/'.join(str(v) for v in labels.values())
            for k, v in scalars.items():
                self._tb.add_scalar(f'{prefix}/{k}' if prefix else k, v, int(step))
            self._tb.flush()
        logging.info('step %d %s: %s', step, ' '.join(f'{k}={v}' for k, v in labels.items()),
                     ', '.join(f'{k}={v:.5g}' for k, v in scalars.items()))

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
    """Arranges generated images (N, H, W, C), any range, in a uint8 grid: one row per class (at
    most 10 classes shown), up to `per_class` samples each; each image min-max scaled. Returns
    (rows*H', cols*W', 3) uint8."""
    images = np.asarray(images, np.float32)
    n, h, w, c = images.shape
    classes = list(range(min(num_classes, 10)))
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

"""What a run writes: metrics lines, TensorBoard files, image grids, the summary."""

import glob
import os
import struct

import numpy as np

from bag_jax import metrics


def tensorboard_scalars(directory) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in the event files under `directory`, read as the
    TFRecords they are (length, crc, Event proto, crc), without TensorFlow."""
    from tensorboardX.proto import event_pb2
    found = []
    for path in sorted(glob.glob(os.path.join(directory, '**', 'events.out.tfevents.*'), recursive=True)):
        with open(path, 'rb') as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack('<Q', data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                found.append((value.tag, event.step, round(value.simple_value, 6)))
    return sorted(found)


def test_resume_drops_the_epochs_done_again_from_jsonl_and_tensorboard(tmp_path):
    workdir = str(tmp_path)
    with metrics.MetricWriter(workdir) as writer:
        for step in (1, 2):
            writer.write(step, {'loss': step / 10}, phase='teacher')
        for step in (1, 2, 3):
            writer.write(step, {'loss': step, 'top1': 10 * step}, phase='bag')
    # Killed after epoch 3's line, before its checkpoint: the rerun resumes after epoch 2.
    with metrics.MetricWriter(workdir) as writer:
        writer.resume('bag', 2)
        writer.write(3, {'loss': 30, 'top1': 31}, phase='bag')
        writer.resume('teacher', 2)     # nothing to drop: the files stay as they are
    lines = metrics.read_metrics(workdir)
    assert [(m['phase'], m['step'], m['loss']) for m in lines] == [
        ('teacher', 1, 0.1), ('teacher', 2, 0.2), ('bag', 1, 1), ('bag', 2, 2), ('bag', 3, 30)]
    assert tensorboard_scalars(tmp_path / 'tensorboard') == sorted([
        ('teacher/loss', 1, 0.1), ('teacher/loss', 2, 0.2), ('bag/loss', 1, 1.0), ('bag/loss', 2, 2.0),
        ('bag/top1', 1, 10.0), ('bag/top1', 2, 20.0), ('bag/loss', 3, 30.0), ('bag/top1', 3, 31.0)])
    # A run restarted from nothing (killed before its first checkpoint) forgets all of its phase.
    with metrics.MetricWriter(workdir) as writer:
        writer.resume('bag', 0)
    assert [m['phase'] for m in metrics.read_metrics(workdir)] == ['teacher', 'teacher']
    assert [tag for tag, _, _ in tensorboard_scalars(tmp_path / 'tensorboard')] == ['teacher/loss', 'teacher/loss']


def test_image_grid_has_a_row_per_class_of_the_first_ten():
    h, w = 4, 3
    labels = np.repeat(np.arange(12), 2)              # 12 classes, 2 images each
    images = np.stack([np.full((h, w, 1), label, np.float32) + np.linspace(0, 1, h * w).reshape(h, w, 1)
                       for label in labels])
    grid = metrics.image_grid(images, labels, num_classes=100, per_class=2)
    assert grid.shape == (metrics.GRID_CLASSES * (h + 1), 2 * (w + 1), 3) and grid.dtype == np.uint8
    for row in range(metrics.GRID_CLASSES):
        for col in range(2):
            cell = grid[row * (h + 1):row * (h + 1) + h, col * (w + 1):col * (w + 1) + w, 0]
            assert cell.min() == 0 and cell.max() == 255        # every cell filled, min-max scaled

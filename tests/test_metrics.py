"""What a run writes: metrics lines, TensorBoard files, image grids, the summary."""

import glob
import os

import numpy as np
import pytest

from bag_jax import data, metrics
from tests.tensorboard_record import assert_tensorboard_matches_record, tensorboard_events, tensorboard_scalars


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
    assert_tensorboard_matches_record(tmp_path)


def test_tensorboard_is_rebuilt_whenever_it_differs_from_metrics_jsonl(tmp_path):
    with metrics.MetricWriter(str(tmp_path)) as writer:
        for step in (1, 2, 3):
            writer.write(step, {'loss': step}, phase='bag')
    # A line TensorBoard never got (as after a kill between the append and the flush); a
    # TensorBoard directory lost altogether.
    with open(tmp_path / 'metrics.jsonl', 'a') as f:
        f.write('{"step": 4, "phase": "bag", "loss": 4.0}\n')
    with metrics.MetricWriter(str(tmp_path)) as writer:
        writer.resume('bag', 4)
    assert_tensorboard_matches_record(tmp_path)
    assert sorted(step for _, step, _ in tensorboard_events(tmp_path / 'tensorboard')) == [1, 2, 3, 4]
    for path in glob.glob(str(tmp_path / 'tensorboard' / '*')):
        os.remove(path)
    with metrics.MetricWriter(str(tmp_path)):
        pass                            # opened and closed: TensorBoard is whole again
    assert_tensorboard_matches_record(tmp_path)


def test_a_line_cut_off_by_a_crash_is_dropped_and_cut(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    assert metrics.read_metrics(str(tmp_path)) == [{'step': 1, 'loss': 1.0}]
    with metrics.MetricWriter(str(tmp_path)) as writer:
        writer.write(2, {'loss': 2.0})
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n'
    assert_tensorboard_matches_record(tmp_path)
    # Garbage in the middle is no crash's doing: an error that names the line.
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(ValueError, match='line 2 is not JSON'):
        metrics.read_metrics(str(tmp_path))


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


def test_readable_grid_upscales_each_image_and_labels_each_row():
    h, w, cols = 8, 8, 3
    labels = np.repeat(np.arange(10), cols)
    images = np.random.default_rng(0).random((len(labels), h, w, 1)).astype(np.float32)
    grid = metrics.image_grid(images, labels, num_classes=10, per_class=cols)
    names = metrics.row_labels(10, metrics.CIFAR10_CLASSES)
    assert names[:2] == ['0: airplane', '1: automobile']
    out = metrics.readable_grid(grid, (h, w), names)
    scale, cell = 8, 8 * 8 + metrics.GRID_GAP             # 8 px images become 64 px
    margin = out.shape[1] - cols * cell
    assert out.shape == (10 * cell, margin + cols * cell, 3) and out.dtype == np.uint8 and margin > 0
    for row in range(10):
        for col in range(cols):
            up = out[row * cell:row * cell + h * scale, margin + col * cell:margin + col * cell + w * scale]
            small = grid[row * (h + 1):row * (h + 1) + h, col * (w + 1):col * (w + 1) + w]
            np.testing.assert_array_equal(up, small.repeat(scale, 0).repeat(scale, 1))    # nearest neighbour
        label = out[row * cell:(row + 1) * cell, :margin]
        assert (label != metrics.GRID_BACKGROUND).any(), f'row {row} has no label'
    # Rows with different labels look different; a large image is not upscaled.
    assert not np.array_equal(out[:cell, :margin], out[cell:2 * cell, :margin])
    big = metrics.image_grid(np.zeros((2, 100, 90, 3)), np.array([0, 1]), num_classes=2, per_class=1)
    assert metrics.readable_grid(big, (100, 90), ['0', '1']).shape[0] == 2 * (100 + metrics.GRID_GAP)


def test_class_names_of_the_sources():
    digits = data.DatasetInfo(name='digits', num_classes=10, image_shape=(8, 8, 1), mean=(0.5,), std=(0.25,),
                              augment='none')
    assert metrics.row_labels(10, metrics.class_names(digits))[:3] == ['0', '1', '2']
    assert metrics.class_names(data.cifar_info('cifar10'))[3] == 'cat'
    cifar100 = metrics.class_names(data.cifar_info('cifar100'))
    assert len(cifar100) == 100 and list(cifar100) == sorted(cifar100)       # tfds's order: alphabetical
    assert metrics.class_names(data.imagenet_info())[0] == 'n01440764'
    assert metrics.class_names(data.imagenet_info('imagefolder', num_classes=7)) is None
    npz = data.DatasetInfo(name='npz', num_classes=12, image_shape=(8, 8, 1), mean=(0.5,), std=(0.25,),
                           augment='none')
    assert metrics.row_labels(12, metrics.class_names(npz)) == [str(i) for i in range(10)]


def test_image_grids_go_to_png_and_tensorboard_and_survive_the_rebuild(tmp_path):
    grid = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    with metrics.MetricWriter(str(tmp_path)) as writer:
        for step in (1, 2, 3):
            writer.write(step, {'loss': step}, phase='bag')
            writer.write_image(step, grid + step, phase='bag')
        writer.write_image(3, grid, phase='bag')        # again: TensorBoard still holds step 3 once
    assert sorted(os.listdir(tmp_path / 'images')) == ['epoch_0001.png', 'epoch_0002.png', 'epoch_0003.png']
    images = [e for e in tensorboard_events(tmp_path / 'tensorboard') if isinstance(e[2], bytes)]
    assert [(tag, step) for tag, step, _ in images] == [('bag/images', 1), ('bag/images', 2), ('bag/images', 3)]
    from PIL import Image
    import io
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(images[2][2]))), grid)
    assert_tensorboard_matches_record(tmp_path)
    # Resumed after epoch 1: the scalars and images of epochs 2 and 3 go, TensorBoard is rebuilt.
    with metrics.MetricWriter(str(tmp_path)) as writer:
        writer.resume('bag', 1)
        writer.resume('teacher', 0)     # other phases' images stay
    assert os.listdir(tmp_path / 'images') == ['epoch_0001.png']
    assert sorted((tag, step) for tag, step, _ in tensorboard_events(tmp_path / 'tensorboard')) == [
        ('bag/images', 1), ('bag/loss', 1)]
    assert_tensorboard_matches_record(tmp_path)

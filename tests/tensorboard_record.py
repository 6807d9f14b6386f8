"""What the TensorBoard files of a workdir hold, read back without TensorFlow: the tests'
check that they hold `metrics.jsonl` and `images/` exactly once (tests/test_metrics.py,
tests/test_drills.py)."""

import glob
import os
import struct
from collections import Counter

import numpy as np

from bag_jax import metrics


def tensorboard_events(directory) -> list[tuple[str, int, float | bytes]]:
    """(tag, step, value) of every scalar and image in the TensorBoard event files of
    `directory`, sorted: the scalar as TensorBoard holds it (a float32), the image as its encoded
    bytes. Read with TensorBoard's EventAccumulator where `tensorboard` is installed; otherwise
    as the TFRecords they are (length, crc, Event proto, crc), in TensorBoard's order (by file
    name), every crc checked: a torn or corrupt record fails."""
    directory = str(directory)
    try:
        from tensorboard.backend.event_processing import event_accumulator as ea
    except ImportError:
        ea = None
    if ea is not None:
        acc = ea.EventAccumulator(directory, size_guidance={ea.SCALARS: 0, ea.IMAGES: 0})
        acc.Reload()
        found = [(tag, e.step, e.value) for tag in acc.Tags()['scalars'] for e in acc.Scalars(tag)]
        found += [(tag, e.step, e.encoded_image_string) for tag in acc.Tags()['images'] for e in acc.Images(tag)]
        return sorted(found, key=repr)
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c
    found = []
    for path in sorted(glob.glob(os.path.join(directory, 'events.out.tfevents.*'))):
        with open(path, 'rb') as f:
            raw = f.read()
        offset = 0
        while offset < len(raw):
            header = raw[offset:offset + 8]
            (length,) = struct.unpack('<Q', header)
            (header_crc,) = struct.unpack('<I', raw[offset + 8:offset + 12])
            record = raw[offset + 12:offset + 12 + length]
            footer = raw[offset + 12 + length:offset + 16 + length]
            assert header_crc == masked_crc32c(header), f'{path}: a corrupt record length at byte {offset}'
            assert len(footer) == 4 and struct.unpack('<I', footer)[0] == masked_crc32c(record), \
                f'{path}: a torn or corrupt record at byte {offset}'
            event = event_pb2.Event.FromString(record)
            offset += 16 + length
            for value in event.summary.value:
                if value.HasField('image'):
                    found.append((value.tag, event.step, value.image.encoded_image_string))
                else:
                    found.append((value.tag, event.step, value.simple_value))
    return sorted(found, key=repr)


def tensorboard_scalars(directory) -> list[tuple[str, int, float]]:
    """The scalars of `tensorboard_events`, rounded to 6 digits."""
    return sorted((tag, step, round(v, 6)) for tag, step, v in tensorboard_events(directory)
                  if not isinstance(v, bytes))


def expected_events(workdir) -> list[tuple[str, int, float | bytes]]:
    """What TensorBoard must hold, from the record: every scalar of metrics.jsonl (as float32)
    and every image of images/, once."""
    found = []
    for m in metrics.read_metrics(str(workdir)):
        prefix = '/'.join(v for v in m.values() if isinstance(v, str))
        found += [(f'{prefix}/{k}' if prefix else k, m['step'], float(np.float32(v))) for k, v in m.items()
                  if k != 'step' and not isinstance(v, str)]
    for path in sorted(glob.glob(os.path.join(str(workdir), metrics.IMAGES_DIR, 'epoch_*.png'))):
        meta = metrics._image_meta(path)
        with open(path, 'rb') as f:
            found.append(('/'.join([*(v for k, v in meta.items() if k != 'step'), 'images']), meta['step'], f.read()))
    return sorted(found, key=repr)


def assert_tensorboard_matches_record(workdir) -> None:
    """TensorBoard holds every scalar of metrics.jsonl and every image, exactly once."""
    held, want = tensorboard_events(os.path.join(str(workdir), metrics.TENSORBOARD_DIR)), expected_events(workdir)
    twice = [e[:2] for e, n in Counter(held).items() if n > 1]
    assert not twice, f'TensorBoard holds these (tag, step) more than once: {twice}'
    missing = [e[:2] for e in want if e not in held]
    extra = [e[:2] for e in held if e not in want]
    assert not missing and not extra, f'TensorBoard lacks {missing}, has besides {extra}'

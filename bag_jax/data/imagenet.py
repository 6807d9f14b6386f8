"""ImageNet's evaluation source imagenet2012 (tfds's ILSVRC2012 validation split, streamed) and
what every ImageNet-style source shares: the reference's Pillow transform and resize rule, the
1000 class ids, the DatasetInfo, data.image_size.
"""

from __future__ import annotations

import functools
import io
import numbers
import os
from collections.abc import Iterator

import numpy as np
from absl import logging
from PIL import Image

from bag_jax.data.tfds_cifar import import_tfds
from bag_jax.data.types import DatasetInfo, DatasetUnavailableError, StreamingDataset, share_bounds

# ImageNet (ILSVRC2012) as the pytorchcv zoo's models expect it (docs/imagenet.md 6): 1000 classes
# in sorted WordNet-id order, normalized with these per-channel values after ToTensor's /255.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_CLASSES = 1000
IMAGENET_IMAGE_SIZE = 224


def imagenet_info(name: str = 'imagenet2012', image_size: int = IMAGENET_IMAGE_SIZE,
                  num_classes: int = IMAGENET_CLASSES) -> DatasetInfo:
    """The DatasetInfo of ImageNet-style data: RGB `image_size` squares, ImageNet normalization."""
    return DatasetInfo(name=name, num_classes=num_classes, image_shape=(image_size, image_size, 3),
                       mean=IMAGENET_MEAN, std=IMAGENET_STD, augment='none')


# The 1000 ILSVRC2012 WordNet ids, sorted: tensorflow-datasets' imagenet2012/labels.txt (4.9.10),
# copied so that the class order needs no tfds at run time: bag_jax/imagenet_classes.txt, package
# data (pyproject.toml), in the folder above this package's.
_IMAGENET_CLASSES_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                      'imagenet_classes.txt')
_IMAGENET_READ_CHUNK = 64      # records read at once from an array_record data source


@functools.lru_cache(maxsize=1)
def imagenet_class_ids() -> tuple[str, ...]:
    """The 1000 ILSVRC2012 class WordNet ids ('n01440764', ...) in sorted order: label i of the
    zoo's models, of torchvision's ImageFolder over the validation folders, and of tfds's
    imagenet2012 is the i-th of them."""
    with open(_IMAGENET_CLASSES_FILE) as f:
        return tuple(line.strip() for line in f if line.strip())


def imagenet_resize_size(image_size: int) -> int:
    """The shorter side an image is resized to before the center crop of `image_size`: 256 for the
    reference's 224 (Resize(256) -> CenterCrop(224), docs/imagenet.md 6), in proportion otherwise."""
    return int(round(image_size * 256 / 224))


def preprocess_image(image: Image.Image, image_size: int = IMAGENET_IMAGE_SIZE) -> np.ndarray:
    """The reference's evaluation transform up to ToTensor (docs/imagenet.md 6), as torchvision
    does it on a PIL image: convert('RGB') (torchvision's pil_loader); Resize(r) with
    r = imagenet_resize_size(image_size), which scales the shorter side to r and the longer one to
    int(r * long / short) (truncated) with PIL's bilinear filter; CenterCrop(image_size), whose
    top-left corner is (int(round((h - s) / 2)), int(round((w - s) / 2))).

    Returns uint8 (image_size, image_size, 3); `normalize` does ToTensor's /255 and the mean/std.
    """
    image = image.convert('RGB')
    resize = imagenet_resize_size(image_size)
    w, h = image.size
    if w <= h:
        new_w, new_h = resize, int(resize * h / w)
    else:
        new_w, new_h = int(resize * w / h), resize
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image, dtype=np.uint8)


def read_image(source, image_size: int = IMAGENET_IMAGE_SIZE) -> np.ndarray:
    """Decodes an image file (a path, or its encoded bytes) with Pillow and returns
    `preprocess_image` of it: uint8 (image_size, image_size, 3). Pillow's errors pass through
    (OSError for an unreadable file)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    with Image.open(source) as image:
        return preprocess_image(image, image_size)


def config_image_size(value) -> int:
    """`data.image_size`, checked: the side of the square crop (IMAGENET_IMAGE_SIZE when unset)."""
    if value is None:
        return IMAGENET_IMAGE_SIZE
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f'data.image_size={value!r} is not allowed: use a positive integer, the side of the '
                         f'square center crop ({IMAGENET_IMAGE_SIZE} in the reference, after resizing the '
                         'shorter side to 256).')
    return int(value)


def _read_encoded_item(item: tuple[bytes, int], *, where: str, image_size: int) -> tuple[np.ndarray, int]:
    encoded, label = item
    try:
        return read_image(encoded, image_size), label
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f'{where}: cannot decode an image of the prepared imagenet2012 validation split '
                         f'({type(e).__name__}: {e}); prepare the dataset again.') from e


def _imagenet2012_unavailable(reason: str, data_dir: str) -> DatasetUnavailableError:
    manual = os.path.join(data_dir, 'downloads', 'manual')
    return DatasetUnavailableError(
        f"data.name='imagenet2012': {reason}. ImageNet cannot be downloaded automatically (its licence "
        'needs a registration), so prepare the validation split once, by hand:\n'
        f'  1. put ILSVRC2012_img_val.tar (6.3 GB, from https://image-net.org/download-images) in\n'
        f'     {manual}/\n'
        '     (ILSVRC2012_img_train.tar is not needed: tfds builds the splits whose archives it finds, and '
        'only the validation split is read);\n'
        '  2. run (with TensorFlow installed)\n'
        f'     python -c "import tensorflow_datasets as tfds; tfds.builder(\'imagenet2012\', data_dir=\'{data_dir}\', '
        "file_format='array_record').download_and_prepare()\"\n"
        "     (array_record is read without TensorFlow; tfds's default tfrecord works too, through tf.data);\n"
        f'  3. pass --config.data.tfds_dir={data_dir}\n'
        'Or, to evaluate on a folder of validation images sorted into class folders '
        '(val/n01440764/ILSVRC2012_val_00000293.JPEG, ...), use --config.data.name=imagefolder '
        '--config.data.imagefolder_dir=/path/to/val.')


def _load_imagenet2012(name: str, tfds_dir, image_size: int, process_index: int,
                       process_count: int) -> StreamingDataset:
    import tensorflow_datasets as tfds   # TensorFlow is imported (GPUs hidden) only for tfrecord copies
    if tfds_dir is not None:
        tfds_dir = os.fspath(tfds_dir)
        if not os.path.isdir(tfds_dir):
            raise _imagenet2012_unavailable(f'data.tfds_dir={tfds_dir!r} does not exist', tfds_dir)
    builder = tfds.builder('imagenet2012', data_dir=tfds_dir)
    data_dir = os.fspath(builder.data_dir_root)
    where = f'data.tfds_dir={tfds_dir!r}' if tfds_dir is not None else f'the default tfds directory {data_dir}'
    # Checked before anything is read: tfds must not try to build it (which needs the manual download).
    if not builder.is_prepared():
        raise _imagenet2012_unavailable(f'{where} holds no prepared copy of it (tfds looks in '
                                        f'{os.fspath(builder.data_dir)})', data_dir)
    if 'validation' not in builder.info.splits:
        raise _imagenet2012_unavailable(f'the copy in {where} was prepared without its validation split', data_dir)
    # tfds's ClassLabel reads datasets/imagenet2012/labels.txt, the sorted WordNet ids: the order of
    # torchvision's ImageFolder (sorted folder names), hence of the pytorchcv zoo (docs/imagenet.md 6).
    names = tuple(builder.info.features['label'].names)
    if names != imagenet_class_ids():
        raise ValueError(f'the imagenet2012 copy in {where} has {len(names)} classes that are not the 1000 sorted '
                         'ILSVRC2012 WordNet ids of the zoo models; prepare it again with tensorflow-datasets.')
    total = builder.info.splits['validation'].num_examples
    start, stop = share_bounds(total, process_index, process_count)
    split = f'validation[{start}:{stop}]'
    # The encoded JPEG bytes, decoded by Pillow as for imagefolder: tf.image's decoding and resizing
    # differ from the reference's (docs/imagenet.md 6).
    decoders = {'image': tfds.decode.SkipDecoding()}
    array_record = str(getattr(builder.info.file_format, 'value', builder.info.file_format)) == 'array_record'
    if not array_record:
        try:
            import_tfds()
        except ImportError as e:
            raise ImportError(f'the imagenet2012 copy in {where} is in tfrecord format, which tfds reads through '
                              'tf.data: pip install tensorflow-cpu, or prepare it again with '
                              "file_format='array_record' (read without TensorFlow).") from e

    def test_items() -> Iterator[tuple[bytes, int]]:
        if stop == start:   # tfds refuses an empty slice
            return
        if array_record:    # random access, TensorFlow-free
            source = builder.as_data_source(split=split, decoders=decoders)
            for chunk in range(0, len(source), _IMAGENET_READ_CHUNK):
                keys = list(range(chunk, min(chunk + _IMAGENET_READ_CHUNK, len(source))))
                for example in source.__getitems__(keys):
                    yield example['image'], int(example['label'])
        else:   # tf.data may interleave the shards: each example of the slice once, in a fixed order
            ds = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
            for example in tfds.as_numpy(ds):
                yield example['image'], int(example['label'])

    return StreamingDataset(
        info=imagenet_info(name, image_size), num_test_total=total, num_test_local=stop - start,
        test_items=test_items,
        load_item=functools.partial(_read_encoded_item, where=where, image_size=image_size))


# ------------------------------------------------------------------------------------------------
# The registry's entries (imagefolder.py's source shares dataset_info and class_names).


def dataset_info(name: str, data_config) -> DatasetInfo:
    """The DatasetInfo of `name` for `data_config.image_size`, without reading anything: ImageNet's
    1000 classes (an image folder of other classes has fewer, known once it is scanned)."""
    return imagenet_info(name, config_image_size(getattr(data_config, 'image_size', None)))


def class_names(info: DatasetInfo) -> tuple[str, ...] | None:
    """The WordNet ids of the 1000 ImageNet classes; None for an image folder of other classes."""
    return imagenet_class_ids() if info.num_classes == IMAGENET_CLASSES else None


def load_imagenet2012(name: str, data_config, process_index: int, process_count: int) -> StreamingDataset:
    """The validation split of tfds's imagenet2012 prepared in `data_config.tfds_dir`, cropped to
    `data_config.image_size`."""
    image_size = config_image_size(getattr(data_config, 'image_size', None))
    ds = _load_imagenet2012(name, getattr(data_config, 'tfds_dir', None), image_size, process_index,
                            process_count)
    log_streaming(ds, process_index, process_count)
    return ds


def log_streaming(ds: StreamingDataset, process_index: int, process_count: int) -> None:
    """Logs what a streamed source holds and this process's share of it."""
    logging.info('%s: %d test images, %d classes, %s crops; streaming a share of %d (process %d of %d).',
                 ds.info.name, ds.num_test_total, ds.info.num_classes, ds.info.image_shape, ds.num_test_local,
                 process_index, process_count)

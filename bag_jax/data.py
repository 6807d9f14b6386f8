"""Real-image data: the tfds CIFAR pipelines, the offline sources, ImageNet evaluation images,
normalization.

Data-free quantization trains on generated images only; real images serve to evaluate on the
test split and to train a full-precision teacher. The small sources are therefore read once into
host memory as uint8 numpy arrays (CIFAR is 150 MB) and served from there (`ArrayDataset`).
ImageNet's 50,000 validation images are not: they are decoded and preprocessed on the host as
the evaluation asks for them, each process its share (`StreamingDataset`). Normalization and
augmentation are pure `jnp` functions that run on device inside the compiled step.

Sources (`data.name`):
  cifar100, cifar10  tfds through tf.data (needs TensorFlow); offline, point `data.tfds_dir` at
                     a prepared copy.
  digits             scikit-learn's bundled 8x8 digits: offline, for tiny runs and tests.
  npz                the user's file `data.npz_path` with x_train, y_train, x_test, y_test.
  imagenet2012       the ILSVRC2012 validation split of tfds's `imagenet2012`, prepared from a
                     manual download in `data.tfds_dir`; evaluation only (no train split).
  imagefolder        `data.imagefolder_dir`, one folder of images per class (torchvision's
                     ImageFolder layout); evaluation only.
The last two get the reference's evaluation transform (docs/imagenet.md 6), with Pillow.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import io
import itertools
import numbers
import os
import socket
import zipfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image

# Test-time normalization of the reference code (docs/algorithms.md 1.3), in [0, 1]
# pixel units.
CIFAR100_MEAN = (0.50705882, 0.48666667, 0.44078431)
CIFAR100_STD = (0.26745098, 0.25568627, 0.27607843)
CIFAR10_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR10_STD = (0.24703233, 0.24348505, 0.26158768)

SOURCES = ('cifar100', 'cifar10', 'digits', 'npz', 'imagenet2012', 'imagefolder')
# Evaluation images only, streamed from files: no train split (see require_train_split).
STREAMING_SOURCES = ('imagenet2012', 'imagefolder')
AUGMENTATIONS = ('none', 'crop_flip')

# num_classes, mean, std of the tfds sources.
_TFDS_SOURCES = {
    'cifar100': (100, CIFAR100_MEAN, CIFAR100_STD),
    'cifar10': (10, CIFAR10_MEAN, CIFAR10_STD),
}
# Where tfds's cifar builders download from. Offline, tfds retries the
# download with backoff for about 3.5 minutes before it fails, so a name lookup comes first.
_TFDS_DOWNLOAD_HOST = 'www.cs.toronto.edu'
_TFDS_READ_BATCH = 4096
_CROP_PADDING = 4      # torchvision RandomCrop(32, padding=4), the usual CIFAR recipe
_MIN_IMAGE_SIZE = 4    # the CIFAR ResNet halves the resolution twice
_NPZ_KEYS = ('x_train', 'y_train', 'x_test', 'y_test')
_DEFAULT_DIGITS_TEST_FRACTION = 0.25


class DatasetUnavailableError(RuntimeError):
    """A tfds dataset is neither prepared locally nor downloadable."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What models and steps need to know about a dataset; hashable, so usable as a jit static."""
    name: str
    num_classes: int
    image_shape: tuple[int, int, int]   # (H, W, C)
    mean: tuple[float, ...]             # per channel, in [0, 1] pixel units (pixel / 255)
    std: tuple[float, ...]
    augment: str                        # 'crop_flip' for CIFAR, 'none' for digit-like data

    def __post_init__(self):
        # Lists (from JSON) become tuples, so that the info stays hashable.
        object.__setattr__(self, 'num_classes', int(self.num_classes))
        object.__setattr__(self, 'image_shape', tuple(int(s) for s in self.image_shape))
        object.__setattr__(self, 'mean', tuple(float(m) for m in self.mean))
        object.__setattr__(self, 'std', tuple(float(s) for s in self.std))
        if len(self.image_shape) != 3:
            raise ValueError(f'DatasetInfo.image_shape must be (H, W, C), got {self.image_shape}.')
        channels = self.image_shape[2]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f'DatasetInfo needs one mean and one std per channel ({channels}), '
                             f'got mean={self.mean}, std={self.std}.')
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f'DatasetInfo.augment={self.augment!r}; allowed: {", ".join(AUGMENTATIONS)}.')

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serializable dict of the fields (tuples become lists)."""
        return {'name': self.name, 'num_classes': self.num_classes,
                'image_shape': list(self.image_shape), 'mean': list(self.mean),
                'std': list(self.std), 'augment': self.augment}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetInfo:
        """Returns the DatasetInfo that `to_dict` described."""
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class ArrayDataset:
    """A dataset in host memory.

    Every process holds the full train split, so that the global training batches do not depend
    on the number of processes (see `train_batches`), and only its own share of the test split,
    since evaluation is sharded.
    """
    info: DatasetInfo
    x_train: np.ndarray     # uint8 (N, H, W, C): the full train split
    y_train: np.ndarray     # int32 (N,)
    x_test: np.ndarray      # uint8 (M_local, H, W, C): this process's share of the test split
    y_test: np.ndarray      # int32 (M_local,)
    num_test_total: int     # size of the whole test split


def _default_decode_threads() -> int:
    return min(32, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class StreamingDataset:
    """A test split read from files as the evaluation goes, never whole in memory.

    Holds this process's contiguous share of the test items (as `np.array_split` lays out
    `num_test_total` items over the processes) as cheap references (a file path, or a record's
    encoded bytes) that `load_item` turns into images; `eval_batches` runs `load_item` in a thread
    pool of `decode_threads`, at most `prefetch_batches` batches ahead of the device step.
    There is no train split: `x_train` / `y_train` raise (`require_train_split`).
    """
    info: DatasetInfo
    num_test_total: int     # size of the whole test split
    num_test_local: int     # size of this process's share
    # () -> this process's share of the items, in order, read lazily; each call starts over.
    test_items: Callable[[], Iterable[Any]]
    # item -> (uint8 (H, W, C) image of info.image_shape, int label); called from several threads.
    load_item: Callable[[Any], tuple[np.ndarray, int]]
    decode_threads: int = dataclasses.field(default_factory=_default_decode_threads)
    prefetch_batches: int = 3

    @property
    def x_train(self) -> np.ndarray:
        """Absent: raises NoTrainSplitError."""
        raise _no_train_split(self, 'reading training images (x_train)')

    @property
    def y_train(self) -> np.ndarray:
        """Absent: raises NoTrainSplitError."""
        raise _no_train_split(self, 'reading training labels (y_train)')


class NoTrainSplitError(ValueError):
    """The dataset holds evaluation images only, and something asked for training images."""


def _no_train_split(dataset: StreamingDataset, purpose: str) -> NoTrainSplitError:
    return NoTrainSplitError(
        f'data.name={dataset.info.name!r} holds evaluation images only (no train split), so {purpose} is not '
        'possible: data-free quantization of an ImageNet model starts from a pretrained teacher. Set '
        'teacher.checkpoint, e.g. --config.teacher.checkpoint=pytorchcv:resnet18 (or a directory written by '
        '`python -m bag_jax.convert`); training an ImageNet teacher is not supported.')


def require_train_split(dataset: ArrayDataset | StreamingDataset, purpose: str = 'training a teacher') -> None:
    """Raises NoTrainSplitError (a ValueError) unless `dataset` has a train split.

    `imagenet2012` and `imagefolder` (a StreamingDataset) hold evaluation images only: data-free
    quantization of an ImageNet model starts from a pretrained teacher, and training one is out of
    scope. `purpose` says what needed the training images, for the message.
    """
    if isinstance(dataset, StreamingDataset):
        raise _no_train_split(dataset, purpose)


# ------------------------------------------------------------------------------------------------
# Loading.


def load_dataset(data_config, *, process_index: int | None = None,
                 process_count: int | None = None) -> ArrayDataset | StreamingDataset:
    """Loads the source named by `data_config.name`: into host memory, or for the ImageNet
    sources (STREAMING_SOURCES) as a StreamingDataset that reads its images when evaluated.

    Args:
        data_config: an `ml_collections.ConfigDict` (or any object with attributes) with `name`
            (one of SOURCES), `npz_path`, `tfds_dir` and `digits_test_fraction` (0.25 when absent);
            for the ImageNet sources `imagefolder_dir` and `image_size` (224 when absent).
        process_index: this process's index; defaults to `jax.process_index()`.
        process_count: the number of processes; defaults to `jax.process_count()`.

    Returns:
        An ArrayDataset with the full train split (uint8 (N, H, W, C), int32 (N,)) and this
        process's contiguous share of the test split (uint8 (M_local, H, W, C), int32 (M_local,));
        the shares of processes 0..process_count-1, in order, make up the whole split. For
        'imagenet2012' and 'imagefolder', a StreamingDataset with the same contiguous share of
        the test items and no train split.

    Raises:
        ValueError: a bad config value, a malformed npz file or image folder; the message names
            the field.
        FileNotFoundError: `data.npz_path` or `data.imagefolder_dir` does not exist.
        DatasetUnavailableError: a tfds dataset is neither prepared nor downloadable.
    """
    process_index, process_count = _resolve_processes(process_index, process_count)
    name = getattr(data_config, 'name', None)
    if name not in SOURCES:
        raise ValueError(f'data.name={name!r} is not a known source; allowed: {", ".join(SOURCES)}.')
    if name in STREAMING_SOURCES:
        image_size = _image_size(getattr(data_config, 'image_size', None))
        if name == 'imagefolder':
            ds = _load_imagefolder(getattr(data_config, 'imagefolder_dir', None), image_size,
                                   process_index, process_count)
        else:
            ds = _load_imagenet2012(getattr(data_config, 'tfds_dir', None), image_size,
                                    process_index, process_count)
        logging.info('%s: %d test images, %d classes, %s crops; streaming a share of %d (process %d of %d).',
                     name, ds.num_test_total, ds.info.num_classes, ds.info.image_shape, ds.num_test_local,
                     process_index, process_count)
        return ds
    if name in _TFDS_SOURCES:
        return _load_tfds(name, getattr(data_config, 'tfds_dir', None), process_index, process_count)
    if name == 'digits':
        fraction = getattr(data_config, 'digits_test_fraction', None)
        if fraction is None:
            fraction = _DEFAULT_DIGITS_TEST_FRACTION
        x_train, y_train, x_test, y_test = _read_digits(fraction)
        num_classes = 10
    else:
        x_train, y_train, x_test, y_test = _read_npz(getattr(data_config, 'npz_path', None))
        num_classes = _check_classes(y_train, y_test, f'data.npz_path={getattr(data_config, "npz_path", None)!r}')
    mean, std = _channel_mean_std(x_train)
    info = DatasetInfo(name=name, num_classes=num_classes, image_shape=x_train.shape[1:],
                       mean=mean, std=std, augment='none')   # a flip changes a digit
    # A contiguous share, laid out as tfds.even_splits lays out the tfds test splits.
    start, stop = _share_bounds(len(x_test), process_index, process_count)
    ds = ArrayDataset(info=info, x_train=x_train, y_train=y_train, x_test=x_test[start:stop],
                      y_test=y_test[start:stop], num_test_total=len(x_test))
    _log_loaded(ds, process_index, process_count)
    return ds


def _resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f'process_index={process_index}, process_count={process_count}: need '
                         'process_count >= 1 and 0 <= process_index < process_count.')
    return int(process_index), int(process_count)


def _log_loaded(ds: ArrayDataset, process_index: int, process_count: int) -> None:
    logging.info('Loaded %s: %d train images of shape %s; test share %d of %d (process %d of %d).',
                 ds.info.name, len(ds.x_train), ds.info.image_shape, len(ds.x_test),
                 ds.num_test_total, process_index, process_count)


def _tfds_unavailable(name: str, reason: str, tfds_dir: str | None) -> DatasetUnavailableError:
    d = tfds_dir or 'DIR'
    return DatasetUnavailableError(
        f'Dataset {name!r} could not be downloaded or found: {reason}. To use it without internet, '
        f'on a machine with internet run\n'
        f'  python -c "import tensorflow_datasets as tfds; '
        f"tfds.builder('{name}', data_dir='{d}').download_and_prepare()\"\n"
        f'then copy {d} here and pass --config.data.tfds_dir={d}')


def _import_tfds():
    """Imports TensorFlow, with its GPUs hidden so that it leaves device memory to JAX, and tfds."""
    try:
        import tensorflow as tf
    except ImportError as e:
        raise ImportError('data.name=cifar100/cifar10 read tfds through tf.data, which needs '
                          'TensorFlow: pip install tensorflow-cpu (or use data.name=digits or npz).') from e
    try:
        tf.config.set_visible_devices([], 'GPU')
    except (RuntimeError, ValueError):   # TF has already initialized its devices
        pass
    import tensorflow_datasets as tfds
    return tf, tfds


def _load_tfds(name: str, tfds_dir: str | None, process_index: int, process_count: int) -> ArrayDataset:
    tf, tfds = _import_tfds()
    if tfds_dir is not None:
        tfds_dir = os.fspath(tfds_dir)
        if not os.path.isdir(tfds_dir):
            raise _tfds_unavailable(name, f'data.tfds_dir={tfds_dir!r} does not exist', tfds_dir)
        # The user points at a prepared copy: if it is not there, fail at once rather than fall
        # back to the network (which, offline, hangs in retries).
        download = False
    else:
        download = True
        builder = tfds.builder(name)
        if not builder.is_prepared():
            try:
                socket.getaddrinfo(_TFDS_DOWNLOAD_HOST, 443)
            except OSError as e:
                raise _tfds_unavailable(
                    name, f'it is not prepared in the default tfds directory {builder.data_dir_root}, '
                    f'{_TFDS_DOWNLOAD_HOST} cannot be reached (no network?) and data.tfds_dir is not set',
                    None) from e
    test_share = tfds.split_for_jax_process('test', process_index=process_index,
                                            process_count=process_count)
    try:
        train_ds, test_ds, test_share_ds = tfds.load(
            name, split=['train', 'test', test_share], data_dir=tfds_dir, as_supervised=True,
            download=download)
        # Batched here rather than with tfds.load(batch_size=-1): that pads to the size of all
        # splits together, and under tfds.testing.mock_data it asks for sys.maxsize rows.
        x_train, y_train = _tf_dataset_to_numpy(tfds, train_ds)
        x_test, y_test = _tf_dataset_to_numpy(tfds, test_share_ds)
        num_test_total = int(test_ds.cardinality())   # from the metadata, nothing is read
        if num_test_total < 0:
            num_test_total = int(test_ds.reduce(0, lambda count, _: count + 1))
    except AssertionError as e:
        if download:
            raise
        # tfds asserts that a prepared copy exists when it may not download one.
        raise _tfds_unavailable(name, f'data.tfds_dir={tfds_dir!r} holds no prepared copy of it '
                                f'(tfds looks in {os.path.join(tfds_dir, name)}/<version>)', tfds_dir) from e
    except (OSError, tf.errors.OpError) as e:
        # A failed download (requests' ConnectionError is an OSError) or unreadable record files.
        where = f'data.tfds_dir={tfds_dir!r}' if tfds_dir is not None else 'the default tfds directory'
        raise _tfds_unavailable(name, f'reading it from {where} failed ({type(e).__name__}: {e})',
                                tfds_dir) from e
    info = cifar_info(name)
    if info.image_shape != x_train.shape[1:]:
        raise ValueError(f'{name}: expected images {info.image_shape}, the prepared copy has {x_train.shape[1:]}.')
    ds = ArrayDataset(info=info, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                      num_test_total=num_test_total)
    _log_loaded(ds, process_index, process_count)
    return ds


def cifar_info(name: str) -> DatasetInfo:
    """The DatasetInfo of 'cifar100' or 'cifar10' (32x32 RGB, the reference's normalization),
    known without loading anything."""
    if name not in _TFDS_SOURCES:
        raise ValueError(f'{name!r} is not a CIFAR dataset; use one of {", ".join(_TFDS_SOURCES)}.')
    num_classes, mean, std = _TFDS_SOURCES[name]
    return DatasetInfo(name=name, num_classes=num_classes, image_shape=(32, 32, 3), mean=mean, std=std,
                       augment='crop_flip')


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


# torchvision's ImageFolder takes files with these extensions, in any case (datasets/folder.py).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
# The 1000 ILSVRC2012 WordNet ids, sorted: tensorflow-datasets' imagenet2012/labels.txt (4.9.10),
# copied so that the class order needs no tfds at run time.
_IMAGENET_CLASSES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'imagenet_classes.txt')
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


def _image_size(value) -> int:
    if value is None:
        return IMAGENET_IMAGE_SIZE
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f'data.image_size={value!r} is not allowed: use a positive integer, the side of the '
                         f'square center crop ({IMAGENET_IMAGE_SIZE} in the reference, after resizing the '
                         'shorter side to 256).')
    return int(value)


def _share_bounds(total: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, stop) of this process's contiguous share of `total` items, as np.array_split lays
    them out (the first total % process_count shares hold one item more)."""
    base, extra = divmod(total, process_count)
    start = process_index * base + min(process_index, extra)
    return start, start + base + (process_index < extra)


def _image_files(folder: str) -> list[str]:
    """The image files anywhere under `folder` (hidden files and folders skipped), sorted."""
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith('.')]
        found += [os.path.join(parent, f) for f in files
                  if not f.startswith('.') and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def _scan_imagefolder(root) -> tuple[list[str], np.ndarray, int]:
    """Lists an image folder: (paths, int32 labels, num_classes), class-major in sorted order.

    Classes are the sorted subfolder names. When every one of them is an ILSVRC2012 WordNet id,
    the label is its index among the 1000 (so a folder with some of the classes still scores
    against a 1000-way network) and num_classes is 1000; otherwise labels are 0..K-1.
    """
    if root is None:
        raise ValueError("data.name='imagefolder' needs data.imagefolder_dir: a folder with one subfolder of "
                         'images per class (ImageNet: val/n01440764/ILSVRC2012_val_00000293.JPEG, ...).')
    root = os.fspath(root)
    where = f'data.imagefolder_dir={root!r}'
    if not os.path.isdir(root):
        raise FileNotFoundError(f'{where}: no such directory. Point it at a folder with one subfolder of images '
                                'per class (ImageNet: val/n01440764/ILSVRC2012_val_00000293.JPEG, ...).')
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
    if not classes:
        loose = [f for f in os.listdir(root) if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
        what = f'its {len(loose)} images lie directly in it' if loose else 'it is empty'
        raise ValueError(f'{where} holds no class folders ({what}): put the images of each class in a subfolder '
                         'named after the class (ImageNet: its WordNet id, val/n01440764/..., as torchvision\'s '
                         'ImageFolder reads them). ILSVRC2012_img_val.tar unpacks flat: sort its images into '
                         "class folders first, or use data.name='imagenet2012', which labels them itself.")
    wnid_index = {w: i for i, w in enumerate(imagenet_class_ids())}
    if all(c in wnid_index for c in classes):
        labels_of, num_classes = [wnid_index[c] for c in classes], len(wnid_index)
    else:
        if all(len(c) == 9 and c[0] == 'n' and c[1:].isdigit() for c in classes):
            logging.warning('%s: the folders look like WordNet ids, but %s are not ILSVRC2012 classes: labels are '
                            '0..%d over the sorted folder names, not the 1000 ImageNet classes.', where,
                            [c for c in classes if c not in wnid_index][:5], len(classes) - 1)
        labels_of, num_classes = list(range(len(classes))), len(classes)
    paths, labels, empty = [], [], []
    for name, label in zip(classes, labels_of):
        files = _image_files(os.path.join(root, name))
        if not files:
            empty.append(name)
        paths += files
        labels += [label] * len(files)
    if empty:
        raise ValueError(f'{where}: the class folder(s) {", ".join(empty[:5])}{" ..." if len(empty) > 5 else ""} '
                         f'hold no image file ({", ".join(IMAGE_EXTENSIONS)}, in any case, at any depth): add '
                         'their images, or remove the folders.')
    return paths, np.asarray(labels, np.int32), num_classes


def _read_imagefolder_item(item: tuple[str, int], *, root: str, image_size: int) -> tuple[np.ndarray, int]:
    path, label = item
    try:
        return read_image(path, image_size), label
    except (OSError, ValueError, Image.DecompressionBombError) as e:   # UnidentifiedImageError is an OSError
        raise ValueError(f'data.imagefolder_dir={root!r}: cannot read the image {path!r} ({type(e).__name__}: '
                         f'{e}). Replace or delete the file: every file with an image extension in a class '
                         'folder is evaluated.') from e


def _load_imagefolder(root, image_size: int, process_index: int, process_count: int) -> StreamingDataset:
    paths, labels, num_classes = _scan_imagefolder(root)
    start, stop = _share_bounds(len(paths), process_index, process_count)
    share = list(zip(paths[start:stop], labels[start:stop].tolist()))
    return StreamingDataset(
        info=imagenet_info('imagefolder', image_size, num_classes), num_test_total=len(paths),
        num_test_local=len(share), test_items=lambda: iter(share),
        load_item=functools.partial(_read_imagefolder_item, root=os.fspath(root), image_size=image_size))


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


def _load_imagenet2012(tfds_dir, image_size: int, process_index: int, process_count: int) -> StreamingDataset:
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
    start, stop = _share_bounds(total, process_index, process_count)
    split = f'validation[{start}:{stop}]'
    # The encoded JPEG bytes, decoded by Pillow as for imagefolder: tf.image's decoding and resizing
    # differ from the reference's (docs/imagenet.md 6).
    decoders = {'image': tfds.decode.SkipDecoding()}
    array_record = str(getattr(builder.info.file_format, 'value', builder.info.file_format)) == 'array_record'
    if not array_record:
        try:
            _import_tfds()
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
        info=imagenet_info('imagenet2012', image_size), num_test_total=total, num_test_local=stop - start,
        test_items=test_items,
        load_item=functools.partial(_read_encoded_item, where=where, image_size=image_size))


def _tf_dataset_to_numpy(tfds, ds) -> tuple[np.ndarray, np.ndarray]:
    """Reads a supervised tf.data.Dataset into (uint8 (N, H, W, C), int32 (N,))."""
    xs, ys = [], []
    for x, y in tfds.as_numpy(ds.batch(_TFDS_READ_BATCH)):
        xs.append(x)
        ys.append(y)
    if not xs:
        return np.zeros((0, *ds.element_spec[0].shape), np.uint8), np.zeros((0,), np.int32)
    return np.concatenate(xs).astype(np.uint8, copy=False), np.concatenate(ys).astype(np.int32)


def _read_digits(test_fraction) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Returns scikit-learn's digits, split: uint8 (N, 8, 8, 1) images, int32 (N,) labels."""
    from sklearn import datasets, model_selection
    if (isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float))
            or not 0.0 < test_fraction < 1.0):
        raise ValueError(f'data.digits_test_fraction={test_fraction!r} must be a fraction in (0, 1).')
    digits = datasets.load_digits()
    # Pixel values are 0..16; scale them to the 0..255 of the other sources.
    x = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)[..., None]
    y = digits.target.astype(np.int32)
    try:
        x_train, x_test, y_train, y_test = model_selection.train_test_split(
            x, y, test_size=test_fraction, stratify=y, random_state=0)
    except ValueError as e:   # one side too small to hold every class
        raise ValueError(f'data.digits_test_fraction={test_fraction!r} leaves a split of the '
                         f'{len(y)} digits without every class: {e}') from e
    return x_train, y_train, x_test, y_test


_ZIP_MAGICS = (b'PK\x03\x04', b'PK\x05\x06')   # what np.load takes for an .npz (a zip archive)
_NPY_MAGIC = b'\x93NUMPY'                         # a single .npy array


def _read_npz(npz_path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reads and checks the user's npz file: uint8 (N, H, W, C) images, int32 (N,) labels."""
    if npz_path is None:
        raise ValueError(f'data.name=npz needs data.npz_path: the path of an .npz file with the '
                         f'arrays {", ".join(_NPZ_KEYS)}.')
    npz_path = os.fspath(npz_path)
    if not os.path.isfile(npz_path):
        raise FileNotFoundError(f'data.npz_path={npz_path!r}: no such file.')
    def unreadable(why) -> ValueError:
        return ValueError(f'data.npz_path={npz_path!r} is not a readable .npz file ({why}); write it '
                          f'with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...).')

    # np.load reads a zip archive as an .npz, '\x93NUMPY' as one .npy array, and anything else as a
    # pickle, which allow_pickle=False refuses with a message about pickles: say what is wrong.
    try:
        with open(npz_path, 'rb') as f:
            head = f.read(len(_NPY_MAGIC))
    except OSError as e:
        raise unreadable(e) from e
    if not head.startswith(_ZIP_MAGICS + (_NPY_MAGIC,)):
        what = 'it is empty' if not head else f'it is not a zip archive, as np.savez writes (it begins with {head!r})'
        raise ValueError(f'data.npz_path={npz_path!r} is not an .npz file (numpy.savez): {what}. It must hold the '
                         f'arrays {", ".join(_NPZ_KEYS)}: write it with np.savez(path, x_train=..., y_train=..., '
                         'x_test=..., y_test=...).')

    read_errors = (OSError, ValueError, EOFError, zipfile.BadZipFile)
    try:
        npz = np.load(npz_path, allow_pickle=False)
    except read_errors as e:
        raise unreadable(e) from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise unreadable('it holds a single array, as an .npy file does')
    with npz:
        missing = [k for k in _NPZ_KEYS if k not in npz.files]
        if missing:
            raise ValueError(f'data.npz_path={npz_path!r} lacks the arrays {", ".join(missing)} (it has: '
                             f'{", ".join(npz.files) or "none"}); required: {", ".join(_NPZ_KEYS)}.')
        try:
            arrays = {k: npz[k] for k in _NPZ_KEYS}
        except read_errors as e:   # a corrupt member, or an object array (needs pickle)
            raise unreadable(e) from e

    splits = {}
    for split in ('train', 'test'):
        x, y = arrays[f'x_{split}'], arrays[f'y_{split}']
        where = f'data.npz_path={npz_path!r}: x_{split}'
        if x.dtype != np.uint8:
            raise ValueError(f'{where} has dtype {x.dtype}; images must be uint8 in 0..255 (convert '
                             'them, e.g. np.round(x * 255).astype(np.uint8) for floats in [0, 1]).')
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise ValueError(f'{where} has shape {x.shape}; images must be (N, H, W) or (N, H, W, C).')
        if len(x) == 0:
            raise ValueError(f'{where} is empty; both splits need at least one image.')
        if min(x.shape[1], x.shape[2]) < _MIN_IMAGE_SIZE:
            raise ValueError(f'{where} images are {x.shape[1]}x{x.shape[2]}; the models need at least '
                             f'{_MIN_IMAGE_SIZE}x{_MIN_IMAGE_SIZE} (they halve the resolution twice).')
        where = f'data.npz_path={npz_path!r}: y_{split}'
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f'{where} has dtype {y.dtype}; labels must be integers 0..K-1 '
                             '(convert them with y.astype(np.int32)).')
        if y.ndim == 2 and y.shape[1] == 1:   # keras-style (N, 1) labels
            y = y[:, 0]
        if y.ndim != 1:
            raise ValueError(f'{where} has shape {y.shape}; labels must be (N,).')
        if len(x) != len(y):
            raise ValueError(f'data.npz_path={npz_path!r}: the {split} split has {len(x)} images '
                             f'(x_{split}) but {len(y)} labels (y_{split}).')
        if y.min() < 0:
            raise ValueError(f'{where} holds negative labels (min {y.min()}); labels must be 0..K-1.')
        if y.max() > np.iinfo(np.int32).max:
            raise ValueError(f'{where} holds labels up to {y.max()}; labels must be 0..K-1.')
        splits[split] = (x, y.astype(np.int32))
    (x_train, y_train), (x_test, y_test) = splits['train'], splits['test']
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f'data.npz_path={npz_path!r}: train images are {x_train.shape[1:]} but test '
                         f'images are {x_test.shape[1:]}; both splits need one (H, W, C).')
    return x_train, y_train, x_test, y_test


def _check_classes(y_train: np.ndarray, y_test: np.ndarray, where: str) -> int:
    """The class count, max(y_train) + 1, after checking that the training split has at least
    two classes and that the test split holds no label the training split lacks."""
    present = np.unique(y_train)
    if len(present) < 2:
        raise ValueError(f'{where}: y_train holds {len(present)} class(es) ({present.tolist()}); a classifier needs '
                         'at least 2, so its accuracy would mean nothing.')
    unseen = np.setdiff1d(np.unique(y_test), present)
    if len(unseen):
        shown = unseen[:10].tolist()
        raise ValueError(f'{where}: y_test holds label(s) {shown}{" ..." if len(unseen) > 10 else ""} that y_train '
                         f'does not; the classes are those of the training split ({len(present)} labels, 0 to '
                         f'{int(present.max())}). Relabel the test split or add those classes to y_train.')
    return int(present.max()) + 1


def _channel_mean_std(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Returns per-channel mean and std of uint8 (N, H, W, C) images, in [0, 1] pixel units."""
    # float64 sums over chunks: a float copy of a large train split need not fit in memory.
    channels = x.shape[-1]
    total, total_sq = np.zeros(channels), np.zeros(channels)
    for start in range(0, len(x), 1024):
        chunk = x[start:start + 1024].reshape(-1, channels) / 255.0
        total += chunk.sum(0)
        total_sq += np.square(chunk).sum(0)
    count = x.size // channels
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    # A constant channel carries nothing; std 1 maps it to 0 rather than to inf.
    std = np.where(std < 1e-6, 1.0, std)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


# ------------------------------------------------------------------------------------------------
# On-device preprocessing: pure, jit-able.


def normalize(images, info: DatasetInfo) -> jax.Array:
    """Returns float32 (images / 255 - mean) / std, of the shape of `images` (..., H, W, C).

    Takes numpy or jnp uint8 arrays, inside or outside jit.
    """
    images = jnp.asarray(images)
    if images.shape[-1] != len(info.mean):
        raise ValueError(f'normalize: the images have {images.shape[-1]} channels, dataset '
                         f'{info.name!r} has {len(info.mean)}.')
    mean = jnp.asarray(info.mean, jnp.float32)
    std = jnp.asarray(info.std, jnp.float32)
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def augment(rng: jax.Array, images, kind: str) -> jax.Array:
    """Returns augmented images, of the shape (N, H, W, C) and dtype of `images`.

    Apply it to raw images, before `normalize`, so that the padding is black as in torchvision's
    RandomCrop(padding=4).

    Args:
        rng: a PRNG key; each image gets its own key split from it.
        images: (N, H, W, C).
        kind: 'none' (identity) or 'crop_flip' (per image: pad 4 zero pixels on each side, crop
            H x W at an offset drawn uniformly from {0..8}^2, then flip left-right with
            probability 1/2). A Python string: static under jit.
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f'augment kind={kind!r}; allowed: {", ".join(AUGMENTATIONS)}.')
    images = jnp.asarray(images)
    if kind == 'none':
        return images
    return jax.vmap(_crop_flip)(jax.random.split(rng, images.shape[0]), images)


def _crop_flip(key: jax.Array, image: jax.Array) -> jax.Array:
    p = _CROP_PADDING
    key_y, key_x, key_flip = jax.random.split(key, 3)
    padded = jnp.pad(image, ((p, p), (p, p), (0, 0)))
    dy = jax.random.randint(key_y, (), 0, 2 * p + 1)
    dx = jax.random.randint(key_x, (), 0, 2 * p + 1)
    crop = jax.lax.dynamic_slice(padded, (dy, dx, 0), image.shape)
    return jnp.where(jax.random.bernoulli(key_flip), crop[:, ::-1], crop)


# ------------------------------------------------------------------------------------------------
# Host-side batching.


def _check_global_batch(ds: ArrayDataset, global_batch_size: int, process_count: int) -> None:
    require_train_split(ds, 'training on real images')
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f'global batch size {global_batch_size} must be a positive multiple of the '
                         f'process count {process_count}.')
    if global_batch_size > len(ds.x_train):
        raise ValueError(f'global batch size {global_batch_size} exceeds the {len(ds.x_train)} '
                         f'training images of {ds.info.name!r}: an epoch would have no batch.')


def steps_per_epoch(ds: ArrayDataset, global_batch_size: int) -> int:
    """Returns the number of full global batches in one epoch over the train split."""
    _check_global_batch(ds, global_batch_size, 1)
    return len(ds.x_train) // global_batch_size


def train_batches(ds: ArrayDataset, global_batch_size: int, *, seed: int, epoch: int,
                  process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields this process's rows of each global training batch of one epoch.

    The global order is a permutation drawn from `np.random.default_rng([seed, epoch])` over the
    full train split; global batch b is perm[b*G:(b+1)*G], and process p takes its rows
    [p*L, (p+1)*L), L = G // process_count. The last incomplete batch is dropped. Every process
    holds the full train split precisely so that the global batches are the same whatever the
    process count, and so that a run resumed at epoch e sees the batches of an uninterrupted run.

    Args:
        ds: the dataset.
        global_batch_size: G, a multiple of the process count, at most the train split's size.
        seed, epoch: select the permutation.
        process_index, process_count: default to `jax.process_index()`, `jax.process_count()`.

    Yields:
        (x uint8 (L, H, W, C), y int32 (L,)), `steps_per_epoch(ds, G)` times.
    """
    process_index, process_count = _resolve_processes(process_index, process_count)
    _check_global_batch(ds, global_batch_size, process_count)
    local = global_batch_size // process_count
    perm = np.random.default_rng([seed, epoch]).permutation(len(ds.x_train))
    for b in range(len(ds.x_train) // global_batch_size):
        rows = perm[b * global_batch_size + process_index * local:][:local]
        yield ds.x_train[rows], ds.y_train[rows]


def eval_batches(ds: ArrayDataset | StreamingDataset, local_batch_size: int, *,
                 process_count: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yields this process's test share in order, in batches of one shape.

    Every batch has `local_batch_size` rows, so one compiled eval step serves all; padded rows are
    zeros with mask False. Every process yields the same number of batches,
    ceil(ceil(num_test_total / process_count) / local_batch_size), because eval steps are
    collective: a process whose share is shorter pads with all-False batches. A StreamingDataset
    is decoded in a thread pool, a few batches ahead of the batch being yielded.

    Args:
        ds: the dataset, loaded for the same process count.
        local_batch_size: B, the rows of each batch on this process.
        process_count: defaults to `jax.process_count()`.

    Yields:
        (x uint8 (B, H, W, C), y int32 (B,), mask bool (B,)).
    """
    if process_count is None:
        process_count = jax.process_count()
    if local_batch_size < 1:
        raise ValueError(f'eval batch size {local_batch_size} must be positive.')
    largest_share = -(-ds.num_test_total // process_count)
    streaming = isinstance(ds, StreamingDataset)
    num_local = ds.num_test_local if streaming else len(ds.x_test)
    if num_local > largest_share:
        raise ValueError(f'this test share has {num_local} of {ds.num_test_total} images, more than '
                         f'1/{process_count} of them: the dataset was loaded for another process count.')
    if streaming:
        yield from _stream_batches(ds, local_batch_size, -(-max(largest_share, 1) // local_batch_size))
        return
    for start in range(0, max(largest_share, 1), local_batch_size):
        x = np.zeros((local_batch_size, *ds.x_test.shape[1:]), ds.x_test.dtype)
        y = np.zeros((local_batch_size,), np.int32)
        mask = np.zeros((local_batch_size,), bool)
        n = max(min(num_local - start, local_batch_size), 0)
        x[:n], y[:n], mask[:n] = ds.x_test[start:start + n], ds.y_test[start:start + n], True
        yield x, y, mask


def _stream_batches(ds: StreamingDataset, local_batch_size: int,
                    num_batches: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`eval_batches` of a StreamingDataset: `num_batches` batches, the last ones padded.

    The items of up to `ds.prefetch_batches` batches beyond the one being assembled are decoding
    in the pool at any time, so decoding overlaps the device step while host memory holds only a
    few batches of images.
    """
    items = iter(ds.test_items())
    pending = collections.deque()     # one list of futures per batch, in order
    submitted = count = 0
    pool = concurrent.futures.ThreadPoolExecutor(max(ds.decode_threads, 1), thread_name_prefix='eval_decode')
    try:
        for _ in range(num_batches):
            while len(pending) <= ds.prefetch_batches and submitted < num_batches:
                chunk = list(itertools.islice(items, local_batch_size))
                pending.append([pool.submit(ds.load_item, item) for item in chunk])
                submitted, count = submitted + 1, count + len(chunk)
            futures = pending.popleft()
            x = np.zeros((local_batch_size, *ds.info.image_shape), np.uint8)
            y = np.zeros((local_batch_size,), np.int32)
            mask = np.zeros((local_batch_size,), bool)
            for i, future in enumerate(futures):
                image, label = future.result()
                if image.shape != ds.info.image_shape:
                    raise ValueError(f'{ds.info.name}: an image came out {image.shape}, not {ds.info.image_shape}.')
                x[i], y[i], mask[i] = image, label, True
            yield x, y, mask
        more = next(items, None) is not None
        if count != ds.num_test_local or more:
            raise RuntimeError(f'{ds.info.name}: this process\'s share should hold {ds.num_test_local} test images, '
                               f'but reading it gave {count}{" and more" if more else ""}.')
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

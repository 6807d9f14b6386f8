"""Real-image data: the tfds CIFAR pipelines, the offline sources, normalization.

Data-free quantization trains on generated images only; real images serve to evaluate on the
test split and to train a full-precision teacher. Every source is therefore read once into host
memory as uint8 numpy arrays (CIFAR is 150 MB) and served from there. Normalization and
augmentation are pure `jnp` functions that run on device inside the compiled step.

Sources (`data.name`):
  cifar100, cifar10  tfds through tf.data (needs TensorFlow); offline, point `data.tfds_dir` at
                     a prepared copy.
  digits             scikit-learn's bundled 8x8 digits: offline, for tiny runs and tests.
  npz                the user's file `data.npz_path` with x_train, y_train, x_test, y_test.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import zipfile
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

# Test-time normalization of the reference code (spec reference-algorithms 1.3), in [0, 1]
# pixel units.
CIFAR100_MEAN = (0.50705882, 0.48666667, 0.44078431)
CIFAR100_STD = (0.26745098, 0.25568627, 0.27607843)
CIFAR10_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR10_STD = (0.24703233, 0.24348505, 0.26158768)

SOURCES = ('cifar100', 'cifar10', 'digits', 'npz')
AUGMENTATIONS = ('none', 'crop_flip')

# num_classes, mean, std of the tfds sources.
_TFDS_SOURCES = {
    'cifar100': (100, CIFAR100_MEAN, CIFAR100_STD),
    'cifar10': (10, CIFAR10_MEAN, CIFAR10_STD),
}
# Where tfds's cifar builders download from (spec jax-stack 1.2). Offline, tfds retries the
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


# ------------------------------------------------------------------------------------------------
# Loading.


def load_dataset(data_config, *, process_index: int | None = None,
                 process_count: int | None = None) -> ArrayDataset:
    """Loads the source named by `data_config.name` into host memory.

    Args:
        data_config: an `ml_collections.ConfigDict` (or any object with attributes) with `name`
            (one of SOURCES), `npz_path`, `tfds_dir` and `digits_test_fraction` (0.25 when absent).
        process_index: this process's index; defaults to `jax.process_index()`.
        process_count: the number of processes; defaults to `jax.process_count()`.

    Returns:
        An ArrayDataset with the full train split (uint8 (N, H, W, C), int32 (N,)) and this
        process's contiguous share of the test split (uint8 (M_local, H, W, C), int32 (M_local,));
        the shares of processes 0..process_count-1, in order, make up the whole split.

    Raises:
        ValueError: a bad config value or a malformed npz file; the message names the field.
        FileNotFoundError: `data.npz_path` does not exist.
        DatasetUnavailableError: a tfds dataset is neither prepared nor downloadable.
    """
    process_index, process_count = _resolve_processes(process_index, process_count)
    name = getattr(data_config, 'name', None)
    if name not in SOURCES:
        raise ValueError(f'data.name={name!r} is not a known source; allowed: {", ".join(SOURCES)}.')
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
    share = np.array_split(np.arange(len(x_test)), process_count)[process_index]
    ds = ArrayDataset(info=info, x_train=x_train, y_train=y_train, x_test=x_test[share],
                      y_test=y_test[share], num_test_total=len(x_test))
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


def eval_batches(ds: ArrayDataset, local_batch_size: int, *,
                 process_count: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yields this process's test share in order, in batches of one shape.

    Every batch has `local_batch_size` rows, so one compiled eval step serves all; padded rows are
    zeros with mask False. Every process yields the same number of batches,
    ceil(ceil(num_test_total / process_count) / local_batch_size), because eval steps are
    collective: a process whose share is shorter pads with all-False batches.

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
    num_local = len(ds.x_test)
    if num_local > largest_share:
        raise ValueError(f'this test share has {num_local} of {ds.num_test_total} images, more than '
                         f'1/{process_count} of them: the dataset was loaded for another process count.')
    for start in range(0, max(largest_share, 1), local_batch_size):
        x = np.zeros((local_batch_size, *ds.x_test.shape[1:]), ds.x_test.dtype)
        y = np.zeros((local_batch_size,), np.int32)
        mask = np.zeros((local_batch_size,), bool)
        n = max(min(num_local - start, local_batch_size), 0)
        x[:n], y[:n], mask[:n] = ds.x_test[start:start + n], ds.y_test[start:start + n], True
        yield x, y, mask

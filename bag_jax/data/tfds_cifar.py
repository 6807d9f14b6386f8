"""CIFAR-100 and CIFAR-10 through tensorflow-datasets (tf.data, so TensorFlow): read whole into
host memory, with the reference's normalization and class names.
"""

from __future__ import annotations

import dataclasses
import os
import socket

import numpy as np

from bag_jax.data.types import ArrayDataset, DatasetInfo, DatasetUnavailableError, log_loaded

# Test-time normalization of the reference code (docs/algorithms.md 1.3), in [0, 1]
# pixel units.
CIFAR100_MEAN = (0.50705882, 0.48666667, 0.44078431)
CIFAR100_STD = (0.26745098, 0.25568627, 0.27607843)
CIFAR10_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR10_STD = (0.24703233, 0.24348505, 0.26158768)


# Class names in label order: tfds's.
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
CIFAR100_CLASSES = (
    'apple', 'aquarium_fish', 'baby', 'bear', 'beaver', 'bed', 'bee', 'beetle', 'bicycle', 'bottle', 'bowl', 'boy',
    'bridge', 'bus', 'butterfly', 'camel', 'can', 'castle', 'caterpillar', 'cattle', 'chair', 'chimpanzee', 'clock',
    'cloud', 'cockroach', 'couch', 'crab', 'crocodile', 'cup', 'dinosaur', 'dolphin', 'elephant', 'flatfish',
    'forest', 'fox', 'girl', 'hamster', 'house', 'kangaroo', 'keyboard', 'lamp', 'lawn_mower', 'leopard', 'lion',
    'lizard', 'lobster', 'man', 'maple_tree', 'motorcycle', 'mountain', 'mouse', 'mushroom', 'oak_tree', 'orange',
    'orchid', 'otter', 'palm_tree', 'pear', 'pickup_truck', 'pine_tree', 'plain', 'plate', 'poppy', 'porcupine',
    'possum', 'rabbit', 'raccoon', 'ray', 'road', 'rocket', 'rose', 'sea', 'seal', 'shark', 'shrew', 'skunk',
    'skyscraper', 'snail', 'snake', 'spider', 'squirrel', 'streetcar', 'sunflower', 'sweet_pepper', 'table', 'tank',
    'telephone', 'television', 'tiger', 'tractor', 'train', 'trout', 'tulip', 'turtle', 'wardrobe', 'whale',
    'willow_tree', 'wolf', 'woman', 'worm')

# Where tfds's cifar builders download from. Offline, tfds retries the
# download with backoff for about 3.5 minutes before it fails, so a name lookup comes first.
_TFDS_DOWNLOAD_HOST = 'www.cs.toronto.edu'
_TFDS_READ_BATCH = 4096


@dataclasses.dataclass(frozen=True)
class Cifar:
    """What is known of a CIFAR dataset without loading it (its registry entry names it)."""
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]


CIFAR100 = Cifar(100, CIFAR100_MEAN, CIFAR100_STD, CIFAR100_CLASSES)
CIFAR10 = Cifar(10, CIFAR10_MEAN, CIFAR10_STD, CIFAR10_CLASSES)


def dataset_info(cifar: Cifar, name: str, data_config=None) -> DatasetInfo:
    """The DatasetInfo of `name` (32x32 RGB, the reference's normalization), known without
    loading anything; `data_config` is not needed."""
    return DatasetInfo(name=name, num_classes=cifar.num_classes, image_shape=(32, 32, 3), mean=cifar.mean,
                       std=cifar.std, augment='crop_flip')


def _tfds_unavailable(name: str, reason: str, tfds_dir: str | None) -> DatasetUnavailableError:
    d = tfds_dir or 'DIR'
    return DatasetUnavailableError(
        f'Dataset {name!r} could not be downloaded or found: {reason}. To use it without internet, '
        f'on a machine with internet run\n'
        f'  python -c "import tensorflow_datasets as tfds; '
        f"tfds.builder('{name}', data_dir='{d}').download_and_prepare()\"\n"
        f'then copy {d} here and pass --config.data.tfds_dir={d}')


def import_tfds():
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


def load(cifar: Cifar, name: str, data_config, process_index: int, process_count: int) -> ArrayDataset:
    """Loads `name` (whose constants are `cifar`) from tfds, as `data_config.tfds_dir` says: the
    full train split and this process's share of the test split."""
    tfds_dir = getattr(data_config, 'tfds_dir', None)
    tf, tfds = import_tfds()
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
    info = dataset_info(cifar, name)
    if info.image_shape != x_train.shape[1:]:
        raise ValueError(f'{name}: expected images {info.image_shape}, the prepared copy has {x_train.shape[1:]}.')
    ds = ArrayDataset(info=info, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                      num_test_total=num_test_total)
    log_loaded(ds, process_index, process_count)
    return ds


def _tf_dataset_to_numpy(tfds, ds) -> tuple[np.ndarray, np.ndarray]:
    """Reads a supervised tf.data.Dataset into (uint8 (N, H, W, C), int32 (N,))."""
    xs, ys = [], []
    for x, y in tfds.as_numpy(ds.batch(_TFDS_READ_BATCH)):
        xs.append(x)
        ys.append(y)
    if not xs:
        return np.zeros((0, *ds.element_spec[0].shape), np.uint8), np.zeros((0,), np.int32)
    return np.concatenate(xs).astype(np.uint8, copy=False), np.concatenate(ys).astype(np.int32)

"""The in-memory sources read with numpy: digits (scikit-learn's bundled 8x8 digits, for tiny
offline runs and tests) and npz (the user's file of x_train, y_train, x_test, y_test), each
normalized with its training split's per-channel statistics.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from bag_jax.data.types import ArrayDataset, DatasetInfo, log_loaded, share_bounds

_MIN_IMAGE_SIZE = 4    # the CIFAR ResNet halves the resolution twice
_NPZ_KEYS = ('x_train', 'y_train', 'x_test', 'y_test')
_DEFAULT_DIGITS_TEST_FRACTION = 0.25


def load_digits(name: str, data_config, process_index: int, process_count: int) -> ArrayDataset:
    """scikit-learn's digits, split as `data_config.digits_test_fraction` (0.25 when unset) says."""
    fraction = getattr(data_config, 'digits_test_fraction', None)
    if fraction is None:
        fraction = _DEFAULT_DIGITS_TEST_FRACTION
    x_train, y_train, x_test, y_test = _read_digits(fraction)
    return _in_memory(name, 10, x_train, y_train, x_test, y_test, process_index, process_count)


def load_npz(name: str, data_config, process_index: int, process_count: int) -> ArrayDataset:
    """The arrays of the file `data_config.npz_path`; the classes are the training split's."""
    x_train, y_train, x_test, y_test = _read_npz(getattr(data_config, 'npz_path', None))
    num_classes = _check_classes(y_train, y_test, f'data.npz_path={getattr(data_config, "npz_path", None)!r}')
    return _in_memory(name, num_classes, x_train, y_train, x_test, y_test, process_index, process_count)


def digits_class_names(info: DatasetInfo) -> tuple[str, ...]:
    """The digits' class names, in label order: the digits themselves."""
    return tuple(str(i) for i in range(info.num_classes))


def _in_memory(name: str, num_classes: int, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
               y_test: np.ndarray, process_index: int, process_count: int) -> ArrayDataset:
    """The ArrayDataset of the full train split and this process's share of the test split."""
    mean, std = _channel_mean_std(x_train)
    info = DatasetInfo(name=name, num_classes=num_classes, image_shape=x_train.shape[1:],
                       mean=mean, std=std, augment='none')   # a flip changes a digit
    # A contiguous share, laid out as tfds.even_splits lays out the tfds test splits.
    start, stop = share_bounds(len(x_test), process_index, process_count)
    ds = ArrayDataset(info=info, x_train=x_train, y_train=y_train, x_test=x_test[start:stop],
                      y_test=y_test[start:stop], num_test_total=len(x_test))
    log_loaded(ds, process_index, process_count)
    return ds


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

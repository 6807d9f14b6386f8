"""The dataset types every source returns (DatasetInfo, ArrayDataset, StreamingDataset), their
errors, and how the processes share a test split.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from absl import logging

AUGMENTATIONS = ('none', 'crop_flip', 'resized_crop_flip')


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
# Processes and their shares of a test split.


def resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(process_index, process_count), each defaulting to jax's, after checking that they fit."""
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f'process_index={process_index}, process_count={process_count}: need '
                         'process_count >= 1 and 0 <= process_index < process_count.')
    return int(process_index), int(process_count)


def share_bounds(total: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, stop) of this process's contiguous share of `total` items, as np.array_split lays
    them out (the first total % process_count shares hold one item more)."""
    base, extra = divmod(total, process_count)
    start = process_index * base + min(process_index, extra)
    return start, start + base + (process_index < extra)


def log_loaded(ds: ArrayDataset, process_index: int, process_count: int) -> None:
    """Logs what an in-memory source loaded."""
    logging.info('Loaded %s: %d train images of shape %s; test share %d of %d (process %d of %d).',
                 ds.info.name, len(ds.x_train), ds.info.image_shape, len(ds.x_test),
                 ds.num_test_total, process_index, process_count)

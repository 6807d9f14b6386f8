"""The one registry of data sources (`data.name`): REGISTRY maps each name to its Source (how to
load it, what is known of it without loading, the config fields it reads, whether it streams, its
class names); SOURCES, STREAMING_SOURCES, DATA_FIELDS and every other list of sources derive
from it. A new source is a module with its loader plus one entry in REGISTRY.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

from bag_jax.data import arrays, imagefolder, imagenet, tfds_cifar
from bag_jax.data.types import ArrayDataset, DatasetInfo, StreamingDataset, resolve_processes


def _no_class_names(info: DatasetInfo) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Source:
    """One data source, `data.name`'s value `name`, and what the rest of the code needs of it."""
    name: str
    # The sources that share a module's loader and constants ('cifar': the CIFAR teachers' data).
    family: str
    # (name, data_config, process_index, process_count) -> the full train split in host memory and
    # this process's share of the test split (ArrayDataset), or the share only (StreamingDataset).
    load: Callable[[str, Any, int, int], ArrayDataset | StreamingDataset]
    # The data config fields it reads besides `name`: what checkpoints record of its config.
    fields: tuple[str, ...]
    # (name, data_config) -> its DatasetInfo without loading any data; None: known once loaded.
    info: Callable[[str, Any], DatasetInfo] | None = None
    # Evaluation images only, read from files as evaluation goes (StreamingDataset): no train split.
    streaming: bool = False
    # DatasetInfo -> the class names in label order, or None where there are none.
    class_names: Callable[[DatasetInfo], Sequence[str] | None] = _no_class_names

    @property
    def has_train_split(self) -> bool:
        return not self.streaming

    @property
    def crops_to_image_size(self) -> bool:
        """Whether its images are cropped to `data.image_size` (ImageNet-style data), so that a
        network that pools globally takes any size of them."""
        return 'image_size' in self.fields


def _cifar(name: str, cifar: tfds_cifar.Cifar) -> Source:
    return Source(name, 'cifar', functools.partial(tfds_cifar.load, cifar), fields=('tfds_dir',),
                  info=functools.partial(tfds_cifar.dataset_info, cifar), class_names=lambda info: cifar.class_names)


REGISTRY: dict[str, Source] = {source.name: source for source in (
    _cifar('cifar100', tfds_cifar.CIFAR100),
    _cifar('cifar10', tfds_cifar.CIFAR10),
    Source('digits', 'arrays', arrays.load_digits, fields=('digits_test_fraction',),
           class_names=arrays.digits_class_names),
    Source('npz', 'arrays', arrays.load_npz, fields=('npz_path',)),
    Source('imagenet2012', 'imagenet', imagenet.load_imagenet2012, fields=('tfds_dir', 'image_size'),
           info=imagenet.dataset_info, streaming=True, class_names=imagenet.class_names),
    Source('imagefolder', 'imagenet', imagefolder.load_imagefolder, fields=('imagefolder_dir', 'image_size'),
           info=imagenet.dataset_info, streaming=True, class_names=imagenet.class_names),
)}

SOURCES = tuple(REGISTRY)
# Evaluation images only, streamed from files: no train split (see require_train_split).
STREAMING_SOURCES = tuple(name for name, source in REGISTRY.items() if source.streaming)

# The data config fields that sources read, in the order that checkpoints record them and
# evaluation summaries list them; a field of a new source that is not here comes after these.
_FIELD_ORDER = ('npz_path', 'tfds_dir', 'imagefolder_dir', 'digits_test_fraction', 'image_size')


def _data_fields() -> tuple[str, ...]:
    used = list(dict.fromkeys(field for source in REGISTRY.values() for field in source.fields))
    rank = lambda field: _FIELD_ORDER.index(field) if field in _FIELD_ORDER else len(_FIELD_ORDER) + used.index(field)
    return ('name', *sorted(used, key=rank))


# Every data config field that some source reads, and `name` (checkpoint.DATA_FIELDS).
DATA_FIELDS = _data_fields()


def source(name) -> Source:
    """The Source named `name`; ValueError, naming the allowed ones, when there is none."""
    if name not in SOURCES:
        raise ValueError(f'data.name={name!r} is not a known source; allowed: {", ".join(SOURCES)}.')
    return REGISTRY[name]


def family(name: str) -> tuple[str, ...]:
    """The names of the sources of family `name` ('cifar': those a CIFAR teacher can come from)."""
    return tuple(n for n, s in REGISTRY.items() if s.family == name)


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
    process_index, process_count = resolve_processes(process_index, process_count)
    name = getattr(data_config, 'name', None)
    return source(name).load(name, data_config, process_index, process_count)


def dataset_info(data_config, *, process_index: int | None = None, process_count: int | None = None) -> DatasetInfo:
    """The DatasetInfo that `data_config` implies, without loading any data where the source
    knows it beforehand (CIFAR's; ImageNet's at `data_config.image_size`, also for an image
    folder, whose own classes are not counted); otherwise that of `load_dataset(data_config)`."""
    name = getattr(data_config, 'name', None)
    entry = source(name)
    if entry.info is not None:
        return entry.info(name, data_config)
    return load_dataset(data_config, process_index=process_index, process_count=process_count).info


def cifar_info(name: str) -> DatasetInfo:
    """The DatasetInfo of 'cifar100' or 'cifar10' (32x32 RGB, the reference's normalization),
    known without loading anything."""
    cifar = family('cifar')
    if name not in cifar:
        raise ValueError(f'{name!r} is not a CIFAR dataset; use one of {", ".join(cifar)}.')
    return REGISTRY[name].info(name, None)


def class_names(info: DatasetInfo) -> tuple[str, ...] | None:
    """The class names of a DatasetInfo's source, in label order, where it has them and they are
    as many as its classes: the digits, CIFAR's, ImageNet's WordNet ids (also of an image folder
    of ImageNet classes); None for the others."""
    entry = REGISTRY.get(info.name)
    names = entry.class_names(info) if entry is not None else None
    return tuple(names) if names is not None and len(names) == info.num_classes else None


def crops_to_image_size(name: str) -> bool:
    """Whether the source `name` crops its images to `data.image_size` (ImageNet-style data, whose
    crop size the user picks for networks that pool globally); False for an unknown name."""
    entry = REGISTRY.get(name)
    return entry is not None and entry.crops_to_image_size

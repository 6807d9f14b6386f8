"""Host-side batching: the global training batches of an epoch (train_batches, steps_per_epoch)
and this process's evaluation batches of one shape (eval_batches), streamed ones through
streamer.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np

from bag_jax.data.streamer import stream_batches
from bag_jax.data.types import ArrayDataset, StreamingDataset, require_train_split, resolve_processes


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
    process_index, process_count = resolve_processes(process_index, process_count)
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
        yield from stream_batches(ds, local_batch_size, -(-max(largest_share, 1) // local_batch_size))
        return
    for start in range(0, max(largest_share, 1), local_batch_size):
        x = np.zeros((local_batch_size, *ds.x_test.shape[1:]), ds.x_test.dtype)
        y = np.zeros((local_batch_size,), np.int32)
        mask = np.zeros((local_batch_size,), bool)
        n = max(min(num_local - start, local_batch_size), 0)
        x[:n], y[:n], mask[:n] = ds.x_test[start:start + n], ds.y_test[start:start + n], True
        yield x, y, mask

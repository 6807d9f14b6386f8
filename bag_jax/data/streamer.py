"""The threaded reader of a StreamingDataset: eval_batches' batches decoded in a thread pool a few
batches ahead of the device step.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
from collections.abc import Iterator

import numpy as np

from bag_jax.data.types import StreamingDataset


def stream_batches(ds: StreamingDataset, local_batch_size: int,
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

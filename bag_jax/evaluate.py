"""Top-1 / top-5 accuracy on the real test split, for teachers and students alike, and the
`evaluate` mode of run.py."""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bag_jax import checkpoint, data, metrics, parallel, validation, zoo


def make_eval_step(apply_fn: Callable, info: data.DatasetInfo, mesh) -> Callable:
    """Compiles one evaluation step over a sharded batch.

    `apply_fn(variables, images) -> logits` with normalized float images; logits (B, classes),
    or (K, B, classes) for K models at once. The returned function takes (variables, x uint8
    (B, H, W, C), y (B,), mask (B,)) and returns the replicated counts (top1_correct,
    top5_correct, n) over the global batch, each of shape () or (K,); padded rows (mask False)
    do not count.
    """
    k = min(5, info.num_classes)

    def step(variables, x, y, mask):
        logits = apply_fn(variables, data.normalize(x, info))
        top = jax.lax.top_k(logits, k)[1]
        hit = top == y[:, None]                       # (..., B, k)
        return (jnp.sum(hit[..., 0] & mask, axis=-1), jnp.sum(jnp.any(hit, axis=-1) & mask, axis=-1),
                jnp.sum(mask))

    return jax.jit(step, out_shardings=parallel.replicated(mesh))


def evaluate(eval_step: Callable, variables, dataset: data.ArrayDataset | data.StreamingDataset, mesh,
             global_batch_size: int) -> dict[str, float]:
    """Runs `eval_step` over the whole test split (every process its share), held in memory
    (ArrayDataset) or decoded from files as it goes (StreamingDataset: ImageNet).

    Returns {'top1': %, 'top5': %, 'images': count}; the accuracies are floats, or lists of K
    floats when the step scores K models.
    """
    local = global_batch_size // jax.process_count()
    top1 = top5 = n = 0
    for x, y, mask in data.eval_batches(dataset, local):
        c1, c5, cn = parallel.to_host(eval_step(variables, *parallel.global_batch(mesh, x, y, mask)))
        top1, top5, n = top1 + c1.astype(np.int64), top5 + c5.astype(np.int64), n + int(cn)
    n = max(n, 1)
    as_percent = lambda c: (100.0 * c / n).tolist()
    return {'top1': as_percent(top1), 'top5': as_percent(top5), 'images': n}


def run_evaluation(config, workdir: str) -> dict[str, float]:
    """The `evaluate` mode: scores `config.checkpoint` (a teacher or a student) on its dataset's
    test split (`config.data.name`, by default the checkpoint's) and writes
    `workdir/summary.json`. Returns the summary. ImageNet-style data (imagenet2012, imagefolder)
    may use another crop size than the checkpoint records (data.image_size)."""
    validation.check_divisible(config.eval_batch_size, jax.device_count(), 'eval_batch_size')
    directory = zoo.checkpoint_directory(config.checkpoint)     # pytorchcv:NAME: the zoo's teacher
    kind, model, variables, meta = checkpoint.load_model(directory, field='checkpoint')
    data_config = config.data.copy_and_resolve_references()
    with data_config.unlocked():
        data_config.name = data_config.name or meta['data']['name']
    dataset = data.load_dataset(data_config)
    info = data.DatasetInfo.from_dict(meta['data'])
    checkpoint.check_compatible(info, dataset.info, 'checkpoint')
    mesh = parallel.make_mesh()
    step = make_eval_step(lambda v, x: model.apply(v, x, train=False), info, mesh)
    result = evaluate(step, parallel.replicate(variables, mesh), dataset, mesh, config.eval_batch_size)
    summary = {'checkpoint': os.path.abspath(directory), 'kind': kind, 'dataset': info.name, **result}
    metrics.write_summary(workdir, summary)
    return summary

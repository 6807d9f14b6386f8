"""Top-1 / top-5 accuracy on the real test split, for teachers and students alike, and the
`evaluate` mode of run.py."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bag_jax import checkpoint, data, metrics, parallel, report, settings, zoo


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
    if n == 0:
        raise ValueError(f'the test split of {dataset.info.name!r} is empty (0 of {dataset.num_test_total} images '
                         'scored): there is nothing to evaluate, and an accuracy of 0 % would mean nothing. Give '
                         'the data a test split (data.npz_path: x_test, y_test; digits: data.digits_test_fraction).')
    as_percent = lambda c: (100.0 * c / n).tolist()
    return {'top1': as_percent(top1), 'top5': as_percent(top5), 'images': n}


def run_evaluation(experiment: settings.Experiment, workdir: str) -> dict[str, float]:
    """The `evaluate` mode: scores `experiment.checkpoint` (a teacher or a student) on the test split
    of the data it was trained or quantized with (the checkpoint's record, `checkpoint.data_config_for`;
    the `experiment.data` fields that are set override it), writes `workdir/summary.json` and prints
    the result as a table (process 0). Returns the summary. ImageNet-style data (imagenet2012,
    imagefolder) may use another crop size than the checkpoint records (data.image_size)."""
    settings.check_divisible(experiment.eval_batch_size, jax.device_count(), 'eval_batch_size')
    directory = zoo.checkpoint_directory(experiment.checkpoint)     # pytorchcv:NAME: the zoo's teacher
    kind, model, variables, meta = checkpoint.load_model(directory, field='checkpoint')
    data_fields, recorded = checkpoint.data_config_for(meta, dataclasses.asdict(experiment.data))
    dataset = load_recorded(data_fields, recorded, directory, kind, '--config.data.')
    info = data.DatasetInfo.from_dict(meta['data'])
    checkpoint.check_compatible(info, dataset.info, 'checkpoint')
    mesh = parallel.make_mesh()
    step = make_eval_step(lambda v, x: model.apply(v, x, train=False), info, mesh)
    result = evaluate(step, parallel.replicate(variables, mesh), dataset, mesh, experiment.eval_batch_size)
    summary = {'checkpoint': os.path.abspath(directory), 'kind': kind, 'dataset': dataset.info.name,
               'data': data_fields, **result}
    if kind == 'student':
        summary.update(w_bits=meta['quant']['w_bits'], a_bits=meta['quant']['a_bits'])
    metrics.write_summary(workdir, summary)
    if jax.process_index() == 0:
        print(report.format_evaluation({**summary, 'arch': meta.get('arch'), 'depth': meta.get('depth')}), flush=True)
    return summary


def load_recorded(data_fields: dict, recorded: list[str], directory: str, kind: str, flag_prefix: str, **processes):
    """`data.load_dataset` of `data_fields` (`checkpoint.data_config_for`); when a file or
    directory recorded in the checkpoint is not there any more, the message says where the path
    came from and which flag overrides it (`flag_prefix` + field)."""
    try:
        return data.load_dataset(settings.DataSpec(**data_fields), **processes)
    except (FileNotFoundError, data.DatasetUnavailableError) as e:
        paths = [f for f in recorded if f in checkpoint.DATA_PATH_FIELDS]
        if not paths:
            raise
        where = ', '.join(f'{f}={data_fields[f]!r}' for f in paths)
        flags = ' / '.join(f'{flag_prefix}{f}=...' for f in paths)
        raise type(e)(f'{e} ({where} is what the {kind} checkpoint {directory!r} records as its data; pass '
                      f'{flags} to use another copy.)') from e

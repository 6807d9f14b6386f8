"""Data-free quantization training: the loop around the compiled step, and its summary.

`train_and_evaluate(experiment, workdir)` trains the K runs of a quantization experiment (its
seeds x sweep points, bag_jax.sweep) in one program: each epoch runs the phase's compiled program
(bag_jax.layouts over bag_jax.step.train_iteration, the method's losses in bag_jax.methods),
then checks the losses, scores every student on the test split, logs, draws the generator's
grid and checkpoints, so that an interrupted run resumes exactly. Each epoch's phase
(calibration, warm-up, fine-tuning) has its own compiled program; the learning-rate milestones
are decided inside it from the traced epoch number.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from bag_jax import checkpoint, console, data, evaluate, metrics, parallel, pool, report, settings, sweep, teacher
from bag_jax.layouts import make_train_epoch
from bag_jax.settings import DFQSpec, Experiment
from bag_jax.step import (Setup, build_setup, init_states, learning_rate, lp_clipped_ranges, phase_of,
                          student_variables)

DFQ_STATE_DIR = 'dfq_state'
IMAGES_DIR = metrics.IMAGES_DIR     # written by MetricWriter.write_image
GRID_PER_CLASS = 8
# Above this many pixels per image (64x64) a run warns with its expected memory: the generator's
# first layer grows with the pixel count (docs/algorithms.md 3), 210M parameters at 512x512.
LARGE_IMAGE_PIXELS = 64 * 64
STUDENTS_DIR = 'students'   # one student per run of a multi-run program: students/<run name>/
RUNTIME_BYTES = 1e9    # the peak memory of a CIFAR-sized run beyond its arrays, measured on CPU


def make_student_eval_step(setup: Setup, info: data.DatasetInfo, mesh) -> Callable:
    """Eval step over all runs' students at once: counts of shape (K,). The test images are split
    over every device (as each process reads them: its own share) and the students gathered to
    every device, so runs sharded over the mesh's 'runs' rows are scored like replicated ones."""
    def apply_all(variables, images):
        per_run = {k: v for k, v in variables.items() if k != 'batch_stats'}
        per_run = jax.lax.with_sharding_constraint(per_run, parallel.replicated(mesh))
        return jax.vmap(lambda v: setup.student.apply({**v, 'batch_stats': variables['batch_stats']}, images))(per_run)
    return evaluate.make_eval_step(apply_all, info, mesh)


def make_image_grid(setup: Setup, seed: int, chunk: int) -> Callable:
    """Compiles the image grid of the first seed's generator: state -> uint8 (rows, cols, 3).

    One row of `GRID_PER_CLASS` images for each of the first `metrics.GRID_CLASSES` classes, from
    fixed latents (the same every epoch). The generator runs on at most `chunk` images at a
    time (the generator normalizes with its batch's statistics, so each call is a batch of
    equal size, the largest divisor of the image count up to `chunk`).
    """
    shown = min(setup.num_classes, metrics.GRID_CLASSES)
    y = jnp.repeat(jnp.arange(shown), GRID_PER_CLASS)
    z = jax.random.normal(jax.random.PRNGKey(seed + 10_000), (len(y), setup.latent_dim))
    size = max(d for d in range(1, min(chunk, len(y)) + 1) if len(y) % d == 0)

    @jax.jit
    def generate(state, z, y):
        variables = {'params': jax.tree.map(lambda a: a[0], state.gen_params),
                     'quant_stats': jax.tree.map(lambda a: a[0], state.gen_quant_stats)}
        return setup.generator.apply(variables, z, y)

    def grid(state) -> np.ndarray:
        images = np.concatenate([np.asarray(generate(state, z[i:i + size], y[i:i + size]))
                                 for i in range(0, len(y), size)])
        return metrics.image_grid(images, np.asarray(y), setup.num_classes, per_class=GRID_PER_CLASS)
    return grid


def warn_about_memory(setup: Setup, info: data.DatasetInfo) -> float | None:
    """Logs a warning with the expected memory of one training iteration when the images are
    larger than `LARGE_IMAGE_PIXELS`; returns that estimate in bytes (None for small images).

    The estimate (float32) counts the generator's parameters four times (value, gradient, Adam's
    two moments), the student's three times (value, gradient, momentum) and the teacher's once,
    every module output of the generator and of two ResNets once per image of the batch, and
    `RUNTIME_BYTES` for JAX itself. With the CIFAR ResNet it is 1.07-1.27x the peak memory
    measured on CPU for 32x32 to 256x256 RGB images at batch 16 (an overestimate since the
    generator's convolutions became sub-pixel ones); with ResNet-18 at 224x224 0.94x
    (bench/NOTES.md).
    """
    height, width, _ = info.image_shape
    if height * width <= LARGE_IMAGE_PIXELS:
        return None
    key = jax.random.PRNGKey(0)
    z, y = jnp.zeros((1, setup.latent_dim)), jnp.zeros((1,), jnp.int32)
    x = jnp.zeros((1,) + info.image_shape)
    count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))

    def sizes(module, *inputs):
        """(parameters, activations per example) of `module`, from shapes alone."""
        variables = jax.eval_shape(lambda: module.init(key, *inputs))
        _, captured = jax.eval_shape(lambda v: module.apply(v, *inputs, capture_intermediates=True,
                                                            mutable=['intermediates']), variables)
        return count(variables['params']), count(captured)

    gen_params, gen_acts = sizes(setup.generator, z, y)
    net_params, net_acts = sizes(setup.teacher, x)
    floats = 4 * gen_params + 4 * net_params + setup.batch_size * (gen_acts + 2 * net_acts)
    estimate = 4.0 * floats + RUNTIME_BYTES
    logging.warning('%dx%d images are larger than %d pixels: one training iteration at batch %d needs about '
                    '%.1f GB of memory per seed (the generator alone has %.1fM parameters). Lower batch_size, or '
                    'use smaller images, if that does not fit.', height, width, LARGE_IMAGE_PIXELS,
                    setup.batch_size, estimate / 1e9, gen_params / 1e6)
    return estimate


def load_teacher_for(experiment: Experiment, workdir: str, dataset: data.ArrayDataset):
    """The teacher (trained first if needed) and its description, checked against the data."""
    directory = teacher.ensure_teacher(experiment, workdir, dataset)
    model, variables, meta = checkpoint.load_teacher(directory)
    info = data.DatasetInfo.from_dict(meta['data'])
    checkpoint.check_compatible(info, dataset.info, 'teacher.checkpoint')
    # The teacher's classes and normalization at the data's image size: ImageNet-style data
    # choose it (data.image_size), and every architecture pools globally.
    return model, variables, meta, dataclasses.replace(info, image_shape=dataset.info.image_shape)


def make_pools(setup: Setup, runs, teacher_variables, info: data.DatasetInfo, loop: str, mesh):
    """The pools of a pool method's runs (bag_jax.pool), stacked on the run axis and sharded like
    the state: one per seed (runs of a sweep with the same seed share it)."""
    made = {}
    for run in runs:
        if run.seed not in made:
            logging.info('pool of seed %d: optimising %d images on the teacher (%d steps per batch of %d)', run.seed,
                         setup.pool.size, setup.pool.steps, setup.pool.batch_size)
            made[run.seed] = pool.synthesize(setup.teacher, teacher_variables, setup.pool, pool.run_key(run.seed),
                                             info.image_shape, info.num_classes, loop=loop,
                                             log_prefix=f'pool of seed {run.seed}')
    stacked = jax.tree.map(lambda *a: np.stack(a), *[made[run.seed] for run in runs])
    return jax.device_put(stacked, parallel.runs_sharded(mesh))


def make_range_clip(setup: Setup, spec: DFQSpec, mesh) -> Callable:
    """state -> state with every run's activation ranges from the L_p search (range_clip)."""
    clip = jax.vmap(lambda st, v: st.replace(stu_quant_stats=lp_clipped_ranges(
        setup, st, v, spec.range_clip_batches, spec.quant.a_bits)), in_axes=(0, None))
    return jax.jit(clip, out_shardings=parallel.runs_sharded(mesh))


def make_mesh(spec: DFQSpec):
    """The ('runs', 'data') mesh of every device the runs train on; ValueError naming the field
    when they do not split over it."""
    rows, _ = sweep.device_split(spec.schedule.batch_size, spec.data_parallel, len(spec.runs), jax.device_count())
    return parallel.make_mesh(runs=rows)


@dataclasses.dataclass
class Progress:
    """What a run has done, checkpointed after every epoch."""
    history: dict              # 'top1', 'top5': [epoch][run] (%); 'diverged': [run] epoch or None
    ptq_top1: Any = None       # after the warm-up: calibrated, not yet fine-tuned
    wall_s: float = 0.0

    def meta(self, epoch: int) -> dict:
        return {'epoch': epoch, 'history': self.history, 'ptq_top1': self.ptq_top1, 'wall_s': self.wall_s}


def train_and_evaluate(experiment: Experiment, workdir: str) -> dict[str, Any]:
    """Runs data-free quantization as `experiment` says: one run, or the K runs of its seeds and
    sweep (bag_jax.sweep) in one program. Returns the summary written to
    `workdir/summary.json` (accuracies in percent; each run's, and each sweep point's mean and
    std over its seeds)."""
    spec, schedule = experiment.dfq, experiment.dfq.schedule
    runs, mesh = list(spec.runs), make_mesh(spec)
    K = len(runs)
    settings.check_divisible(experiment.eval_batch_size, jax.device_count(), 'eval_batch_size')
    dataset = data.load_dataset(experiment.data)
    teacher_model, teacher_host, teacher_meta, info = load_teacher_for(experiment, workdir, dataset)
    setup = build_setup(spec, teacher_model, info)
    if K > 1:
        logging.info('%d runs (%s) on a %s (runs x data) mesh', K, ', '.join(r.name for r in runs),
                     ' x '.join(map(str, mesh.devices.shape)))
    teacher_variables = parallel.replicate(teacher_host, mesh)

    # The teacher's own top-1, measured here on the same test split.
    teacher_eval = evaluate.make_eval_step(lambda v, x: teacher_model.apply(v, x), info, mesh)
    teacher_top1 = evaluate.evaluate(teacher_eval, teacher_variables, dataset, mesh,
                                     experiment.eval_batch_size)['top1']

    warn_about_memory(setup, info)
    state = init_states(setup, teacher_host, experiment.seed, K, mesh, seeds=[r.seed for r in runs],
                        hparams=spec.swept_values())
    train_epoch = make_train_epoch(setup, mesh, K, schedule.epoch_loop)
    eval_step = make_student_eval_step(setup, info, mesh)
    image_grid = make_image_grid(setup, experiment.seed, experiment.eval_batch_size)
    done = Progress(history={'top1': [], 'top5': [], 'diverged': [None] * K})
    start = 0
    with checkpoint.TrainingCheckpoints(os.path.join(workdir, DFQ_STATE_DIR)) as ckpts, \
            metrics.MetricWriter(workdir) as writer:
        restored = ckpts.restore(state)
        if restored is not None:
            start, state, meta = restored
            done = Progress(history=meta['history'], ptq_top1=meta['ptq_top1'], wall_s=meta['wall_s'])
            if start > schedule.epochs:
                raise ValueError(f'epochs={schedule.epochs} is fewer than the {start} epochs that the run in {workdir} '
                                 f'has finished: use epochs={start} or more to extend it, or a new --workdir.')
            logging.info('quantization: resuming after epoch %d of %d', start, schedule.epochs)
        elif setup.pool is not None:
            state = state.replace(pool=make_pools(setup, runs, teacher_variables, info, train_epoch.loop, mesh))
        writer.resume(spec.method, start)
        iters = schedule.iters_per_epoch
        with console.Progress(schedule.epochs * iters, initial=start * iters, desc=spec.method,
                              unit='iteration', images_per_step=schedule.batch_size * K,
                              enabled=jax.process_index() == 0) as progress:
            compiled_phases = set()
            for epoch in range(start, schedule.epochs):
                t0 = time.time()
                phase = phase_of(setup, epoch)
                if phase not in compiled_phases:
                    compiled_phases.add(phase)
                    logging.info('epoch %d: compiling the %s program (once per run; XLA on CPU may take minutes, a '
                                 'cached program loads in seconds)', epoch + 1, phase.name)
                state, epoch_metrics = train_epoch(state, teacher_variables, jnp.int32(epoch), progress.update)
                if spec.range_clip == 'lp' and epoch == schedule.calibration_epochs - 1 and spec.quant.a_bits:
                    logging.info('epoch %d: activation ranges from the L_p search over %d generator batches',
                                 epoch + 1, spec.range_clip_batches)
                    state = make_range_clip(setup, spec, mesh)(state, teacher_variables)
                epoch_metrics = {k: np.atleast_1d(np.asarray(v)) for k, v in parallel.to_host(epoch_metrics).items()}
                live = _check_finite(epoch_metrics, done.history['diverged'], runs, epoch, ckpts.latest_epoch(),
                                     os.path.join(workdir, DFQ_STATE_DIR))
                result = evaluate.evaluate(eval_step, student_variables(state, teacher_variables), dataset, mesh,
                                           experiment.eval_batch_size)
                scalars = _record_epoch(spec, runs, done, epoch, epoch_metrics, live, result, time.time() - t0)
                if epoch % schedule.log_every == 0 or epoch == schedule.epochs - 1:
                    writer.write(epoch + 1, scalars, phase=spec.method)
                progress.set_postfix(epoch=epoch + 1, loss_g=f'{scalars["loss_g"]:.3f}',
                                     loss_s=f'{scalars["loss_s"]:.3f}', top1=f'{scalars["top1"]:.2f}')
                every = schedule.image_grid_every
                if every and (epoch % every == 0 or epoch == schedule.epochs - 1):
                    # The generator's parameters live on every process's devices: all run it, process 0 writes.
                    grid = image_grid(state)
                    if jax.process_index() == 0:     # images/epoch_NNNN.png and TensorBoard, rows labelled
                        labels = metrics.row_labels(info.num_classes, metrics.class_names(info))
                        writer.write_image(epoch + 1, metrics.readable_grid(grid, info.image_shape[:2], labels),
                                           phase=spec.method)
                ckpts.save(epoch + 1, state, done.meta(epoch + 1))

    _save_students(experiment, workdir, state, teacher_host, teacher_model, teacher_meta, info, done)
    summary = make_summary(experiment, done.history, done.ptq_top1, teacher_top1, done.wall_s, jax.device_count())
    metrics.write_summary(workdir, summary)
    if jax.process_index() == 0:
        print(report.format_summary(summary), flush=True)
    return summary


def _record_epoch(spec: DFQSpec, runs, done: Progress, epoch: int, epoch_metrics, live, result,
                  seconds: float) -> dict[str, float]:
    """Adds the epoch's accuracies to `done` and returns its scalars for the metric writer."""
    top1, top5 = np.atleast_1d(result['top1']).tolist(), np.atleast_1d(result['top5']).tolist()
    done.history['top1'].append(top1)
    done.history['top5'].append(top5)
    if epoch == spec.schedule.warmup_epochs - 1:
        done.ptq_top1 = top1     # calibrated, not yet fine-tuned
    done.wall_s += seconds
    scalars = {k: float(v[live].mean()) for k, v in epoch_metrics.items()}    # of the runs still finite
    # The student does not step during warm-up: its rate is 0 there.
    lr_student = learning_rate(spec.hypers.student_lr, jnp.int32(epoch), spec.schedule.lr_milestones,
                               spec.hypers.lr_decay)
    scalars.update(top1=float(np.mean(np.asarray(top1)[live])), top5=float(np.mean(np.asarray(top5)[live])),
                   lr_student=float(lr_student) if epoch >= spec.schedule.warmup_epochs else 0.0, epoch_s=seconds)
    if len(runs) > 1:     # each run's accuracies, under its name
        scalars.update({f'{name}/{run.name}': value[k] for name, value in (('top1', top1), ('top5', top5))
                        for k, run in enumerate(runs)})
    return scalars


def _save_students(experiment: Experiment, workdir: str, state, teacher_host, teacher_model, teacher_meta, info,
                   done: Progress) -> None:
    """Writes each run's student: workdir/student for one run, students/<run name>/ for several."""
    spec = experiment.dfq
    host_state = parallel.to_host(state)
    for k, run in enumerate(spec.runs):
        directory = os.path.join(workdir, 'student' if len(spec.runs) == 1 else os.path.join(STUDENTS_DIR, run.name))
        # Kept when a finished run starts again; rewritten when a run is extended.
        if _student_epochs(directory) != spec.schedule.epochs:
            variables = {'params': jax.tree.map(lambda a: a[k], host_state.stu_params),
                         'quant_stats': jax.tree.map(lambda a: a[k], host_state.stu_quant_stats),
                         'batch_stats': teacher_host['batch_stats']}
            meta = checkpoint.model_meta(
                info, teacher_model, source=f'{spec.method} from {teacher_meta["source"]}', data_config=experiment.data,
                quant=dataclasses.asdict(spec.quant), top1=done.history['top1'][-1][k], epochs=spec.schedule.epochs,
                seed=run.seed, overrides=dict(run.overrides), diverged_epoch=done.history['diverged'][k])
            checkpoint.save_model(directory, variables, meta, 'student')


def _check_finite(epoch_metrics: dict[str, np.ndarray], diverged: list, runs: list[sweep.Run], epoch: int,
                  last_checkpoint: int | None, state_dir: str) -> np.ndarray:
    """Marks in `diverged` the runs whose losses stopped being finite in `epoch` (0-based) and
    returns the indices of the runs still finite. A single run stops there, as does a program
    whose every run has diverged (FloatingPointError naming the loss and the last good
    checkpoint); among several, a diverged run is logged and left behind, and the others go on."""
    finite = np.all([np.isfinite(v) for v in epoch_metrics.values()], axis=0)
    for k in np.flatnonzero(~finite):
        if diverged[k] is None:
            diverged[k] = epoch + 1
            if len(runs) > 1:
                bad = [name for name, v in epoch_metrics.items() if not np.isfinite(v[k])]
                logging.warning('run %s diverged in epoch %d (%s not finite): it is left behind, the other runs go on; '
                                'its results count the epochs before.', runs[k].name, epoch + 1, ', '.join(bad))
    live = np.asarray([k for k, d in enumerate(diverged) if d is None], int)
    if not len(live):
        name, values = next((n, v) for n, v in epoch_metrics.items() if not np.all(np.isfinite(v)))
        raise FloatingPointError(
            f'epoch {epoch + 1}: {name} is {values.tolist()} (not finite). Stopped; the last good checkpoint '
            f'({"none yet" if last_checkpoint is None else f"after epoch {last_checkpoint}"}) is kept in '
            f'{state_dir}. Lower generator.lr/student.lr or check the teacher.')
    return live


def _student_epochs(directory: str) -> int | None:
    """The epochs the student checkpoint in `directory` was trained for (None: none there)."""
    if not checkpoint.is_model_checkpoint(directory, 'student'):
        return None
    with open(os.path.join(directory, checkpoint.STUDENT_META)) as f:
        return json.load(f).get('epochs')


def make_summary(experiment: Experiment, history, ptq_top1, teacher_top1, wall_s, devices) -> dict[str, Any]:
    """The summary from the per-epoch accuracies (history['top1'][epoch][run], percent): `runs`
    (each run's) and `groups` (each sweep point's mean and std over its seeds, bag_jax.sweep);
    without a sweep, also the accuracies at the top level (with several seeds: mean and std over
    those that did not diverge, and a `per_seed` table)."""
    spec = experiment.dfq
    runs = list(spec.runs)
    results = sweep.run_results(runs, history['top1'], ptq_top1, history.get('diverged'),
                                spec.schedule.warmup_epochs)
    groups = sweep.groups_of(results)
    summary = {
        'method': spec.method, 'w_bits': experiment.record['quant']['w_bits'],
        'a_bits': experiment.record['quant']['a_bits'], 'teacher_top1': teacher_top1,
    }
    keys = ('ptq_top1', 'best_top1', 'best_epoch', 'last_top1')
    if not spec.sweep:
        if len(runs) == 1:
            summary.update({key: results[0][key] for key in keys})
        else:
            summary.update({key: groups[0][key] for key in keys if key != 'best_epoch'})
            summary['best_epoch'] = [r['best_epoch'] for r in results]
    summary.update({
        'epochs': spec.schedule.epochs, 'iterations': spec.schedule.epochs * spec.schedule.iters_per_epoch,
        'batch_size': spec.schedule.batch_size, 'num_seeds': spec.num_seeds, 'num_runs': len(runs),
        'sweep': {field: list(values) for field, values in spec.sweep},
        'wall_s': wall_s, 'devices': devices,
        'runs': results, 'groups': groups,
        'note': 'best_top1 is the best epoch on the test split (how the papers report); last_top1 is the final epoch',
    })
    if not spec.sweep and len(runs) > 1:
        summary['per_seed'] = {key: [r[key] for r in results] for key in ('seed', *keys, 'diverged_epoch')}
    return summary

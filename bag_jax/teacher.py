"""Full-precision teacher training: SGD with Nesterov momentum and a cosine schedule on real
data, data-parallel over every device, evaluated and checkpointed every epoch.

Layout of a workdir:
    W/teacher_state/   per-epoch training checkpoints (resume)
    W/teacher/         the finished teacher (checkpoint.save_teacher), what quantization uses
    W/metrics.jsonl    one line per epoch, phase 'teacher'
"""

from __future__ import annotations

import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from absl import logging

from bag_jax import checkpoint, console, data, evaluate, metrics, parallel, settings, zoo
from bag_jax.models import ResNetCifar
from bag_jax.settings import Experiment, TeacherSpec

TEACHER_DIR = 'teacher'
TEACHER_STATE_DIR = 'teacher_state'


@flax.struct.dataclass
class TeacherState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def teacher_optimizer(spec: TeacherSpec, total_steps: int) -> optax.GradientTransformation:
    """SGD, Nesterov momentum, coupled weight decay (as PyTorch's), cosine decay to 0 over the run."""
    schedule = optax.cosine_decay_schedule(spec.lr, max(total_steps, 1))
    return optax.chain(optax.add_decayed_weights(spec.weight_decay),
                       optax.sgd(schedule, momentum=spec.momentum, nesterov=True))


def make_train_step(model: ResNetCifar, tx: optax.GradientTransformation, info: data.DatasetInfo,
                    seed: int, label_smoothing: float, mesh):
    """Compiles one teacher step: (state, x uint8 (B,H,W,C), y (B,)) -> (state, {'loss', 'accuracy'}).

    Augmentation (keyed by seed and step) and normalization run on device inside the step.
    """
    base_key = jax.random.PRNGKey(seed)

    def step(state: TeacherState, x, y):
        key = jax.random.fold_in(base_key, state.step)
        images = data.normalize(data.augment(key, x, info.augment), info)

        def loss_fn(params):
            logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats}, images,
                                          train=True, mutable=['batch_stats'])
            targets = optax.smooth_labels(jax.nn.one_hot(y, info.num_classes), label_smoothing)
            return optax.softmax_cross_entropy(logits, targets).mean(), (logits, updates['batch_stats'])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = TeacherState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                 batch_stats=batch_stats, opt_state=opt_state)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
        return new_state, {'loss': loss, 'accuracy': accuracy}

    repl = parallel.replicated(mesh)
    return jax.jit(step, donate_argnums=(0,), out_shardings=(repl, repl))


def train_teacher(experiment: Experiment, workdir: str, dataset: data.ArrayDataset | None = None) -> str:
    """Trains a full-precision ResNetCifar on `experiment.data` with `experiment.teacher` settings.

    Resumes from `workdir/teacher_state` if a run was interrupted; returns the path of the finished
    teacher checkpoint (`workdir/teacher`), which records its test top-1/top-5.
    """
    tc = experiment.teacher
    settings.check_divisible(tc.batch_size, jax.device_count(), 'teacher.batch_size')
    settings.check_divisible(experiment.eval_batch_size, jax.device_count(), 'eval_batch_size')
    dataset = dataset or data.load_dataset(experiment.data)
    data.require_train_split(dataset, purpose='training a teacher')
    info = dataset.info
    model = ResNetCifar(num_classes=info.num_classes, depth=tc.depth)
    mesh = parallel.make_mesh()
    steps = data.steps_per_epoch(dataset, tc.batch_size)
    tx = teacher_optimizer(tc, steps * tc.epochs)

    def init(key):
        variables = model.init(key, jnp.zeros((1,) + info.image_shape))
        return TeacherState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                            batch_stats=variables['batch_stats'], opt_state=tx.init(variables['params']))

    state = jax.jit(init, out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(experiment.seed))
    train_step = make_train_step(model, tx, info, experiment.seed, tc.label_smoothing, mesh)
    eval_step = evaluate.make_eval_step(lambda v, x: model.apply(v, x, train=False), info, mesh)

    start, result = 0, {}
    with checkpoint.TrainingCheckpoints(os.path.join(workdir, TEACHER_STATE_DIR)) as ckpts, \
            metrics.MetricWriter(workdir) as writer:
        restored = ckpts.restore(state)
        if restored is not None:
            start, state, meta = restored
            result = meta.get('result', {})
            logging.info('teacher: resuming after epoch %d of %d', start, tc.epochs)
        writer.resume('teacher', start)
        with console.Progress(steps * tc.epochs, initial=steps * start, desc='teacher', unit='step',
                              images_per_step=tc.batch_size, enabled=jax.process_index() == 0) as progress:
            if start < tc.epochs:
                logging.info('teacher: compiling the training step (once; a cached program loads in seconds)')
            for epoch in range(start, tc.epochs):
                t0 = time.time()
                totals = []
                for x, y in data.train_batches(dataset, tc.batch_size, seed=experiment.seed, epoch=epoch):
                    state, m = train_step(state, *parallel.global_batch(mesh, x, y))
                    totals.append(m)
                    progress.live = {'step_loss': m['loss']}
                    progress.update(1)
                train_metrics = {k: float(jnp.mean(jnp.stack([m[k] for m in totals]))) for k in totals[0]}
                progress.set_postfix(epoch=epoch + 1, loss=f'{train_metrics["loss"]:.3f}')
                result = evaluate.evaluate(eval_step, {'params': state.params, 'batch_stats': state.batch_stats},
                                           dataset, mesh, experiment.eval_batch_size)
                writer.write(epoch + 1, {**train_metrics, 'test_top1': result['top1'], 'test_top5': result['top5'],
                                         'epoch_s': time.time() - t0}, phase='teacher')
                ckpts.save(epoch + 1, state, {'epoch': epoch + 1, 'result': result})

    variables = parallel.to_host({'params': state.params, 'batch_stats': state.batch_stats})
    directory = os.path.join(workdir, TEACHER_DIR)
    meta = checkpoint.model_meta(info, model, source=f'trained by bag_jax.teacher, {tc.epochs} epochs',
                                 data_config=experiment.data, top1=result.get('top1'), top5=result.get('top5'))
    checkpoint.save_teacher(directory, variables, meta)
    if jax.process_index() == 0:
        from bag_jax import report
        print(report.format_teacher({'checkpoint': os.path.abspath(directory), 'arch': meta['arch'],
                                     'depth': meta.get('depth'), 'epochs': tc.epochs, 'dataset': info.name,
                                     'images': result.get('images'), 'top1': result.get('top1'),
                                     'top5': result.get('top5')}), flush=True)
    return directory


def ensure_teacher(experiment: Experiment, workdir: str, dataset: data.ArrayDataset | None = None) -> str:
    """The teacher a quantization run uses: `experiment.teacher.checkpoint` if set (a directory, or
    'pytorchcv:NAME': the zoo file, fetched and converted once, `bag_jax.zoo`), else a finished
    teacher in `workdir/teacher`, else one trained there now. Returns its directory."""
    if experiment.teacher.checkpoint:
        return zoo.checkpoint_directory(experiment.teacher.checkpoint)
    directory = os.path.join(workdir, TEACHER_DIR)
    if checkpoint.is_teacher_checkpoint(directory):
        logging.info('using the teacher already trained in %s', directory)
        return directory
    logging.info('teacher.checkpoint is unset: training a full-precision teacher into %s first', directory)
    return train_teacher(experiment, workdir, dataset)

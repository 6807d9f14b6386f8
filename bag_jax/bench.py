"""Times the real joint GDFQ/AdaDFQ/BAG training step, with a random teacher (no data needed).

    python -m bag_jax.bench --config=configs/cifar100_w3a3.py [--config.batch_size=16] --steps=N

It builds the epoch function of `--steps` iterations that training runs (`layouts.make_train_epoch`),
runs a calibration epoch and a fine-tuning epoch untimed (each compiles its phase's program;
compile_s = those two calls less two timed ones), then `--repeats` fine-tuning epochs, and prints
per-iteration times. The last line printed is one JSON object: step_s_median (one iteration of
all runs), step_s_min, step_s_per_run, compile_s, compiled_while_timed (programs traced during
the timed calls: 0), images_per_s (all runs) and images_per_s_per_run, flops_per_iteration
(XLA's cost analysis, all runs, all devices) and flops_per_s (achieved), peak_rss_mb, device_kind,
device_count, device_peak_bytes (where the backend reports it), plus the settings. The config's
num_seeds, sweep and data_parallel choose the runs and the mesh as in training
(bag_jax.sweep). `--parts` also times the pieces of an iteration separately (see `time_parts`).
"""

from __future__ import annotations

import dataclasses
import json
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from bag_jax import data, dfq, losses, parallel, settings, step
from bag_jax.layouts import make_train_epoch
from bag_jax import models
from bag_jax.models import bn_input_pairs

def teacher_architecture(teacher: settings.TeacherSpec, info: data.DatasetInfo) -> dict:
    """The architecture the teacher has, known without its weights: the zoo network of
    `teacher.checkpoint=pytorchcv:NAME`, else a CIFAR ResNet of `teacher.depth`."""
    name = (teacher.checkpoint or '').removeprefix('pytorchcv:')
    if name in models.PYTORCHCV_NETWORKS:
        return {**models.PYTORCHCV_NETWORKS[name], 'num_classes': info.num_classes}
    return {'arch': 'resnet_cifar', 'depth': teacher.depth, 'num_classes': info.num_classes}


def random_teacher(info: data.DatasetInfo, architecture: dict, seed: int = 0):
    """A network of `architecture` (models.describe's form) with random weights and plausible,
    non-trivial BN statistics."""
    model = models.build(architecture)
    variables = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1,) + info.image_shape))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 1000))
    stats = jax.tree_util.tree_map_with_path(
        lambda path, v: (jax.random.uniform(next(keys), v.shape, minval=0.5, maxval=2.0)
                         if path[-1].key == 'var' else 0.1 * jax.random.normal(next(keys), v.shape)),
        variables['batch_stats'])
    return model, {'params': variables['params'], 'batch_stats': stats}


def bench_info(spec: settings.DataSpec) -> data.DatasetInfo:
    """The dataset description the data settings imply, without loading the data where the source
    knows it beforehand (`data.dataset_info`: CIFAR's, ImageNet's at data.image_size)."""
    return data.dataset_info(spec)


def _block(tree):
    jax.tree.map(lambda a: a.block_until_ready(), tree)


def _timed(fn, *args, repeats: int):
    out = fn(*args)               # compile + first run
    _block(out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _block(fn(*args))
        times.append(time.perf_counter() - t0)
    return times


def time_parts(setup: step.Setup, state: step.DFQState, teacher_variables, repeats: int) -> dict[str, float]:
    """Median seconds of each piece of one iteration, compiled on its own:

    generate (G forward), teacher_fwd (P forward with BN statistics), student_fwd (Q forward),
    generator_step (G forward+backward through P and, for AdaDFQ/BAG, Q), student_step (Q
    forward+backward on a fixed batch), iteration (the whole joint step).
    """
    one = jax.tree.map(lambda a: a[0], state)
    z = jax.random.normal(jax.random.PRNGKey(0), (setup.batch_size, setup.latent_dim))
    y = jnp.arange(setup.batch_size) % setup.num_classes
    stats = teacher_variables['batch_stats']
    gen_vars = {'params': one.gen_params, 'quant_stats': one.gen_quant_stats}
    stu_vars = {'params': one.stu_params, 'quant_stats': one.stu_quant_stats, 'batch_stats': stats}
    x = jax.jit(lambda v: setup.generator.apply(v, z, y))(gen_vars)

    def teacher_fwd(v, x):
        t, col = setup.teacher.apply(v, x, mutable=['bn_inputs'])
        return t, losses.bns_loss(bn_input_pairs(col['bn_inputs'], v['batch_stats']))

    def student_step(params, x):
        return jax.grad(lambda p: losses.adadfq_student_loss(
            setup.student.apply({**stu_vars, 'params': p}, x), jnp.zeros((x.shape[0], setup.num_classes))))(params)

    parts = {
        'generate': (jax.jit(lambda v: setup.generator.apply(v, z, y)), (gen_vars,)),
        'teacher_fwd': (jax.jit(teacher_fwd), (teacher_variables, x)),
        'student_fwd': (jax.jit(lambda v, x: setup.student.apply(v, x)), (stu_vars, x)),
        'student_step': (jax.jit(student_step), (one.stu_params, x)),
        'iteration': (jax.jit(lambda s, t: step.train_iteration(setup, s, t, jnp.int32(setup.warmup_epochs),
                                                                step.phase_of(setup, setup.warmup_epochs))),
                      (one, teacher_variables)),
    }

    def generator_step(gen_params):
        def loss(p):
            images = setup.generator.apply({**gen_vars, 'params': p}, z, y)
            t, bns = teacher_fwd(teacher_variables, images)
            s = setup.student.apply(stu_vars, images) if setup.method.generator_sees_student else t
            return losses.adadfq_generator_loss(t, s, y, bns)
        return jax.grad(loss)(gen_params)
    parts['generator_step'] = (jax.jit(generator_step), (one.gen_params,))
    return {name: statistics.median(_timed(fn, *args, repeats=repeats)) for name, (fn, args) in parts.items()}


def run_bench(experiment: settings.Experiment, steps: int, repeats: int, parts: bool = False) -> dict:
    """Compiles and times `steps` joint iterations of `experiment` (a quantization run's, parsed
    by settings.parse); returns the result dict (see module docstring)."""
    spec = experiment.dfq
    spec = dataclasses.replace(spec, schedule=dataclasses.replace(spec.schedule, iters_per_epoch=steps))
    mesh = dfq.make_mesh(spec)     # the mesh training would use
    K = len(spec.runs)
    info = bench_info(experiment.data)
    teacher_model, teacher_host = random_teacher(info, teacher_architecture(experiment.teacher, info), experiment.seed)
    setup = step.build_setup(spec, teacher_model, info)
    teacher_variables = parallel.replicate(teacher_host, mesh)
    state = step.init_states(setup, teacher_host, experiment.seed, K, mesh, seeds=[r.seed for r in spec.runs],
                             hparams=spec.swept_values())
    train_epoch = make_train_epoch(setup, mesh, K, spec.schedule.epoch_loop)
    # The first call compiles the calibration program and calibrates the activation ranges (epoch
    # 0); the second compiles the fine-tuning program (each phase has its own, layouts.make_train_epoch)
    # on an epoch after warm-up, where both networks step; the timed calls run that program again.
    epoch = jnp.int32(max(spec.schedule.warmup_epochs, spec.schedule.calibration_epochs))   # ranges frozen, both step
    untimed_s = 0.0
    for first_epoch in (jnp.int32(0), epoch):
        t0 = time.perf_counter()
        state, m = train_epoch(state, teacher_variables, first_epoch)
        _block((state, m))
        untimed_s += time.perf_counter() - t0
    programs = train_epoch.programs()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, m = train_epoch(state, teacher_variables, epoch)
        _block((state, m))
        times.append((time.perf_counter() - t0) / steps)
    compile_s = untimed_s - 2 * statistics.median(times) * steps
    compiled_while_timed = train_epoch.programs() - programs
    flops = train_epoch.iteration_flops(state, teacher_variables, epoch)
    if not all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(parallel.to_host(m))):
        raise FloatingPointError('the benchmarked step produced non-finite losses')
    device = jax.devices()[0]
    memory = device.memory_stats() or {}
    result = {
        'method': spec.method, 'w_bits': experiment.record['quant']['w_bits'],
        'a_bits': experiment.record['quant']['a_bits'],
        'batch_size': spec.schedule.batch_size, 'num_seeds': spec.num_seeds, 'num_runs': K,
        'sweep': {field: list(values) for field, values in spec.sweep},
        'mesh_runs': mesh.shape[parallel.RUNS_AXIS], 'mesh_data': mesh.shape[parallel.DATA_AXIS], 'steps': steps, 'repeats': repeats,
        'epoch_loop': train_epoch.loop, 'compiled_while_timed': compiled_while_timed,
        'step_s_median': statistics.median(times), 'step_s_min': min(times), 'compile_s': compile_s,
        'step_s_per_run': statistics.median(times) / K,
        'images_per_s': spec.schedule.batch_size * K / statistics.median(times),
        'images_per_s_per_run': spec.schedule.batch_size / statistics.median(times),
        'flops_per_iteration': flops, 'flops_per_s': flops / statistics.median(times),
        'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        'device_kind': device.device_kind, 'device_count': jax.device_count(),
        'device_peak_bytes': memory.get('peak_bytes_in_use'),
    }
    if parts:
        result['parts_s'] = time_parts(setup, state, teacher_variables, repeats)
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    f = flags.FLAGS
    result = run_bench(settings.parse(f.config), f.steps, f.repeats, f.parts)
    for key, value in result.items():
        print(f'{key:>20}: {value}', file=sys.stderr)
    print(json.dumps(result))


if __name__ == '__main__':
    # Defined here, not at import, so that importing the module (tests, bench/accelerator_check.py)
    # leaves absl's global flags to whoever owns the command line.
    config_flags.DEFINE_config_file('config', None, 'Path to a quantization config.', lock_config=True)
    flags.DEFINE_integer('steps', 20, 'Iterations per timed call.')
    flags.DEFINE_integer('repeats', 5, 'Timed calls after the first (compiling) one.')
    flags.DEFINE_boolean('parts', False, 'Also time the parts of an iteration separately.')
    flags.mark_flags_as_required(['config'])
    app.run(main)

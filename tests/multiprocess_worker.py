"""One process of the two-process test in tests/test_parallel.py, which starts two of these.

    python tests/multiprocess_worker.py WORKDIR CACHE_DIR TEACHER_DIR

Joins the run that JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID describe (read
by the library, as in `python run.py`) with 2 CPU devices of its own. Then, in this one process
so that start-up and compilation are paid once:
  1. `one_step_results(TEACHER_DIR)`: what training does not amplify (one step from the same
     state, the data order), written by process 0 to WORKDIR/one_step.npz;
  2. the quantization command of `multiprocess_config()`, twice in WORKDIR: the first run
     trains the teacher, quantizes, and is interrupted in epoch 2; the second resumes it;
  3. the 2-run sweep of `sweep_config()` on that teacher, twice in WORKDIR/sweep, the first
     interrupted in epoch 2.
Writes WORKDIR/process_<i>.json with what this process saw and returned.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tests.tiny_config import get_config as tiny_config  # noqa: E402

LOCAL_DEVICES = 2


def multiprocess_config():
    """The tiny BAG run, at 8 bits: at 3 bits the 4-iteration student scores at chance, which
    would leave the compared accuracies nothing to show."""
    c = tiny_config('bag')
    c.quant.w_bits = 8
    c.quant.a_bits = 8
    return c


def sweep_config(teacher_dir: str):
    """`multiprocess_config()` sweeping loss.channel_attention over (0, 5): two runs."""
    c = multiprocess_config()
    c.teacher.checkpoint = teacher_dir
    c.sweep = {'loss.channel_attention': (0.0, 5.0)}
    return c


def one_step_results(teacher_dir: str) -> dict[str, np.ndarray]:
    """What training does not amplify, on this process's mesh (every process calls it together;
    tests/trajectories.py says why these and not the parameters):

      data/teacher_labels   the first global batch of teacher training, gathered (exact)
      teacher/...           one teacher SGD step from the initial state: metrics, the gradient,
                            the BN running statistics
      calibrate/...         the calibration iteration of `trajectories.dfq_one_step` with the
                            teacher in `teacher_dir` (W8A8): its metrics, gradient and ranges
      float/calibrate/..., float/finetune/...   both iterations of the same step without
                            quantizers (`trajectories.float_config`)
    """
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    from bag_jax import checkpoint, data, parallel, settings, step, teacher
    from bag_jax.models import ResNetCifar
    from tests import trajectories

    c = multiprocess_config()
    dataset = data.load_dataset(c.data)
    info = dataset.info
    mesh = parallel.make_mesh()
    x, y = next(data.train_batches(dataset, c.teacher.batch_size, seed=c.seed, epoch=0))
    x, y = parallel.global_batch(mesh, x, y)
    out = {'data/teacher_labels': np.asarray(multihost_utils.process_allgather(y, tiled=True))}
    model = ResNetCifar(num_classes=info.num_classes, depth=c.teacher.depth)
    tx = teacher.teacher_optimizer(settings.parse(c).teacher, 100)
    variables = model.init(jax.random.PRNGKey(c.seed), jnp.zeros((1,) + info.image_shape))
    start = parallel.replicate(teacher.TeacherState(
        step=jnp.zeros((), jnp.int32), params=variables['params'], batch_stats=variables['batch_stats'],
        opt_state=tx.init(variables['params'])), mesh)
    after, m = teacher.make_train_step(model, tx, info, c.seed, c.teacher.label_smoothing, mesh)(start, x, y)
    out.update({f'teacher/metrics/{k}': v for k, v in trajectories.flat(m).items()})
    out.update({f'teacher/gradient/{k}': v for k, v in trajectories.flat(trajectories.sgd_gradient(after.opt_state)).items()})
    out.update({f'teacher/batch_stats/{k}': v for k, v in trajectories.flat(after.batch_stats).items()})

    teacher_model, teacher_variables, _ = checkpoint.load_teacher(teacher_dir)
    setup = step.build_setup(settings.parse(c).dfq, teacher_model, info)
    out.update(trajectories.dfq_one_step(setup, teacher_variables, mesh, c.seed, finetune=False))
    float_setup = step.build_setup(settings.parse(trajectories.float_config(c)).dfq, teacher_model, info)
    out.update({f'float/{k}': v for k, v in trajectories.dfq_one_step(
        float_setup, teacher_variables, mesh, c.seed, student_noise=trajectories.FLOAT_STUDENT_NOISE).items()})
    return out


def _gloo_on_loopback() -> None:
    """Makes the CPU collectives (gloo) listen on 127.0.0.1 rather than on the address that the
    host name resolves to. JAX has no public setting for it; where its internals differ, gloo
    keeps its default."""
    try:
        from jax._src import distributed, xla_bridge
        from jax._src.lib import _jax

        def make_cpu_client():
            collectives = _jax.make_gloo_tcp_collectives(distributed.global_state.client, hostname='127.0.0.1')
            return xla_bridge.make_cpu_client(collectives=collectives)
        xla_bridge.register_backend_factory('cpu', make_cpu_client, priority=0, fail_quietly=False)
    except (AttributeError, ImportError, TypeError, RuntimeError) as e:
        print(f'gloo keeps its default address: {e!r}', file=sys.stderr)


def main(workdir: str, cache_dir: str, teacher_dir: str) -> None:
    jax.config.update('jax_num_cpu_devices', LOCAL_DEVICES)
    # Process 0 writes the cache (JAX lets no other process write), so that its resumed run
    # does not compile again.
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    _gloo_on_loopback()
    from bag_jax import experiment, metrics, parallel

    parallel.initialize_distributed()
    results = one_step_results(teacher_dir)
    if jax.process_index() == 0:
        np.savez(os.path.join(workdir, 'one_step.npz'), **results)

    c = multiprocess_config()
    write = metrics.MetricWriter.write

    def interrupted_in_epoch_two(self, step, *args, **kwargs):
        # Every process stops at the same point, as a preemption of the job stops them all: the
        # checkpoint after epoch 1 is complete, epoch 2's never started.
        if step == 2 and kwargs.get('phase') == 'bag':
            raise KeyboardInterrupt('simulated interruption')
        return write(self, step, *args, **kwargs)

    metrics.MetricWriter.write = interrupted_in_epoch_two
    try:
        experiment.run(c, workdir)
        raise AssertionError('the run was not interrupted')
    except KeyboardInterrupt:
        pass
    metrics.MetricWriter.write = write
    summary = experiment.run(c, workdir)

    # A 2-run sweep of the teacher just trained, one run per process's devices (a 2 x 2 mesh),
    # interrupted in epoch 2 and resumed likewise.
    s = sweep_config(os.path.join(workdir, 'teacher'))
    metrics.MetricWriter.write = interrupted_in_epoch_two
    try:
        experiment.run(s, os.path.join(workdir, 'sweep'))
        raise AssertionError('the sweep was not interrupted')
    except KeyboardInterrupt:
        pass
    metrics.MetricWriter.write = write
    sweep_summary = experiment.run(s, os.path.join(workdir, 'sweep'))

    with open(os.path.join(workdir, f'process_{jax.process_index()}.json'), 'w') as f:
        json.dump({'process_index': jax.process_index(), 'process_count': jax.process_count(),
                   'local_devices': jax.local_device_count(), 'devices': jax.device_count(),
                   'summary': summary, 'sweep_summary': sweep_summary}, f)


if __name__ == '__main__':
    main(*sys.argv[1:])

"""How far the same run drifts on another mesh or CPU: the measurement behind the bounds in
tests/trajectories.py.

    # one trajectory per layout and ISA (each in its own process):
    for isa in default AVX2 AVX SSE4_2; do for devices in 1 2 4; do
      XLA_FLAGS=$([ $isa = default ] || echo --xla_cpu_max_isa=$isa) JAX_PLATFORMS=cpu \\
        python bench/trajectory_spread.py run OUT/${isa}_${devices}.npz $devices TEACHER_DIR
    done; done
    python bench/trajectory_spread.py compare OUT/*.npz

`run` records, after every step: the tiny digits teacher's 42 SGD steps (tests/tiny_config.py),
then 6 DFQ iterations (BAG W3A3, BAG W8A8, GDFQ W3A3) from the teacher in TEACHER_DIR (fixed, so
that only the DFQ steps differ), and the test accuracies. `compare` prints, per step, the largest
difference between any two trajectories, as a fraction of each array's largest magnitude.
"""

import itertools
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run(out: str, devices: int, teacher_dir: str) -> None:
    import jax
    jax.config.update('jax_num_cpu_devices', devices)
    import jax.numpy as jnp
    import numpy as np

    from bag_jax import checkpoint, data, dfq, evaluate, parallel, settings, step, teacher
    from bag_jax.models import ResNetCifar
    from tests import tiny_config
    from tests.trajectories import flat

    c = tiny_config.get_config()
    dataset = data.load_dataset(c.data)
    info = dataset.info
    mesh = parallel.make_mesh()
    dump = {}
    model = ResNetCifar(num_classes=info.num_classes, depth=c.teacher.depth)
    tx = teacher.teacher_optimizer(c.teacher, data.steps_per_epoch(dataset, c.teacher.batch_size) * c.teacher.epochs)

    def init(key):    # as teacher.train_teacher initializes (compiled: eager init rounds differently)
        variables = model.init(key, jnp.zeros((1,) + info.image_shape))
        return teacher.TeacherState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                                    batch_stats=variables['batch_stats'], opt_state=tx.init(variables['params']))
    state = jax.jit(init, out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(c.seed))
    teacher_step = teacher.make_train_step(model, tx, info, c.seed, c.teacher.label_smoothing, mesh)
    n = 0
    for epoch in range(c.teacher.epochs):
        for x, y in data.train_batches(dataset, c.teacher.batch_size, seed=c.seed, epoch=epoch):
            state, _ = teacher_step(state, *parallel.global_batch(mesh, x, y))
            n += 1
            dump.update({f'teacher_{n}:{k}': v for k, v in flat({'params': state.params,
                                                                   'batch_stats': state.batch_stats}).items()})
    eval_step = evaluate.make_eval_step(lambda v, x: model.apply(v, x, train=False), info, mesh)
    dump['teacher_top1'] = np.asarray(evaluate.evaluate(
        eval_step, {'params': state.params, 'batch_stats': state.batch_stats}, dataset, mesh, 200)['top1'])

    teacher_model, teacher_variables, _ = checkpoint.load_teacher(teacher_dir)
    teacher_variables = parallel.replicate(teacher_variables, mesh)
    for method, bits in (('bag', 3), ('bag', 8), ('gdfq', 3)):
        cc = tiny_config.get_config(method)
        cc.quant.w_bits = cc.quant.a_bits = bits
        setup = step.build_setup(settings.parse(cc).dfq, teacher_model, info)
        iteration = jax.jit(lambda s, e, phase: step.train_iteration(setup, s, teacher_variables, e, phase,
                                                                    parallel.batch_sharded(mesh)), static_argnums=2)
        one = jax.tree.map(lambda a: a[0], step.init_states(setup, teacher_variables, 0, 1, mesh))
        n = 0
        for epoch in range(3):
            for _ in range(cc.iters_per_epoch):
                one, m = iteration(one, jnp.int32(epoch), step.phase_of(setup, epoch))
                n += 1
                dump.update({f'{method}{bits}_{n}:{k}': v for k, v in flat(
                    {'gen': one.gen_params, 'gen_gradient': one.gen_opt_state.mu, 'stu': one.stu_params,
                     'ranges': one.stu_quant_stats, 'metrics': m}).items()})
        students = jax.tree.map(lambda a: a[None], one)
        result = evaluate.evaluate(dfq.make_student_eval_step(setup, info, mesh),
                                   step.student_variables(students, teacher_variables), dataset, mesh, 200)
        dump[f'{method}{bits}_top1'] = np.asarray(result['top1'])
    if jax.process_index() == 0:
        np.savez(out, **dump)


def compare(paths: list[str]) -> None:
    import numpy as np
    runs = {os.path.basename(p)[:-4]: np.load(p) for p in paths}
    names = list(runs)
    first = runs[names[0]]
    steps = {}
    for key in first.files:
        match = re.match(r'(\w+?)_(\d+):(.*)', key)
        if match:
            steps.setdefault((match.group(1), int(match.group(2))), []).append(key)

    def spread(key):
        return max(float(np.abs(runs[a][key] - runs[b][key]).max() / max(np.abs(runs[b][key]).max(), 1e-30))
                   for a, b in itertools.combinations(names, 2))

    print(f'{len(names)} trajectories: {", ".join(names)}')
    for (run_name, n) in sorted(steps):
        by_kind = {}
        for key in steps[(run_name, n)]:
            leaf = key.split(':', 1)[1]
            kind = leaf.split('/')[0] + ('/bias' if leaf.startswith('gen/') and leaf.endswith('bias') else '')
            if kind == 'metrics':
                kind = leaf
            by_kind[kind] = max(by_kind.get(kind, 0.0), spread(key))
        print(f'{run_name} step {n}: ' + ', '.join(f'{k} {v:.1e}' for k, v in sorted(by_kind.items())))
    for key in sorted(k for k in first.files if k.endswith('top1')):
        print(key, sorted({round(float(runs[name][key].ravel()[0]), 4) for name in names}))


if __name__ == '__main__':
    if sys.argv[1] == 'run':
        run(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        compare(sys.argv[2:])

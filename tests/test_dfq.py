"""The joint GDFQ/AdaDFQ/BAG step and the training loop, on tiny digits runs."""

import dataclasses
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bag_jax import checkpoint, data, dfq, experiment, layouts, losses, metrics, parallel, settings, step
from bag_jax.models import Generator, ResNetCifar
from configs import evaluate as evaluate_config
from tests import trajectories
from tests.conftest import interrupted, tiny_config
from tests.dfq_setup import config_with, make_setup


def trees_equal(a, b):
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)))


def test_learning_rate_milestones():
    lr = lambda e: float(step.learning_rate(1e-4, jnp.int32(e), (100, 200, 300), 0.1))
    assert [lr(0), lr(99)] == pytest.approx([1e-4, 1e-4])
    assert [lr(100), lr(199), lr(200), lr(300), lr(399)] == pytest.approx([1e-5, 1e-5, 1e-6, 1e-7, 1e-7])


def test_methods_and_ablations_build_the_right_networks(digits_teacher):
    setup, _ = make_setup(config_with(digits_teacher, 'bag'))
    assert setup.generator.quant.w_bits == 3 and setup.generator.quant.a_bits is None
    assert setup.student.quant.w_bits == 3 and setup.student.quant.a_bits == 3
    assert setup.hypers.channel_attention > 0 and setup.hypers.bns == 1.0 and setup.distill
    setup, _ = make_setup(config_with(digits_teacher, 'bag', **{'generator.quantize': False,
                                                                'generator.quantize_activations': True}))
    assert setup.generator.quant.w_bits is None and setup.generator.quant.a_bits == 3
    setup, _ = make_setup(config_with(digits_teacher, 'adadfq'))
    assert setup.generator.quant is None and setup.hypers.channel_attention == 0 and not setup.distill
    setup, _ = make_setup(config_with(digits_teacher, 'gdfq', **{'quant.w_bits': 4, 'quant.a_bits': 32}))
    assert setup.hypers.bns == 0.1 and setup.student.quant.w_bits == 4 and setup.student.quant.a_bits is None
    assert setup.method.name == 'gdfq' and not setup.method.generator_sees_student


@pytest.mark.parametrize('layers,count', [('branch', 3), ('unit_out', 3), ('stage_out', 3), ('conv', 9)])
def test_distilled_feature_selection(digits_teacher, layers, count):
    model, variables, _ = checkpoint.load_teacher(digits_teacher)
    _, col = model.apply(variables, jnp.zeros((2, 8, 8, 1)), mutable=['features', 'bn_inputs'])
    feats = step.distilled_features(col, layers)
    assert len(feats) == count
    assert [f.shape[-1] for f in feats][-1] == 64


def test_stage_out_takes_the_last_unit_of_each_stage():
    """Any architecture: units named stage{S}_unit{U}, stages of different lengths, 10+ units."""
    units = [(1, 1), (2, 1), (2, 2), (2, 10), (3, 1), (1, 2), (2, 3)]
    features = {f'stage{s}_unit{u}': {'out': jnp.full((1,), 100 * s + u), 'branch': jnp.zeros((1,))}
                for s, u in units}
    outs = step.distilled_features({'features': features}, 'stage_out')
    assert [int(o[0]) for o in outs] == [102, 210, 301]
    outs = step.distilled_features({'features': features}, 'unit_out')
    assert [int(o[0]) for o in outs] == [101, 102, 201, 202, 203, 210, 301]


def test_phase_programs_give_the_results_of_the_traced_phases():
    """One iteration of the calibration phase and one of fine-tuning, per method, against what the
    step gave before each phase had its own program and the student step reused the generator
    step's student forward (recorded by tests/make_dfq_step_fixture.py at that commit, on an
    AVX-512 CPU): equal to rounding, that of another CPU included (tests/trajectories.py)."""
    from tests import make_dfq_step_fixture as fixture
    with np.load(fixture.OUT) as f:
        before = {k: f[k] for k in f.files}
    now = fixture.one_steps()
    for method in fixture.METHODS:
        pick = lambda d: {k[len(method) + 1:]: v for k, v in d.items() if k.startswith(method + '/')}
        trajectories.assert_one_step_close(pick(now), pick(before), tiny_config().batch_size, what=f'{method}: ',
                                           tol=trajectories.QUANTIZED_ONE_STEP_SPREAD,
                                           a_bits=tiny_config().quant.a_bits)


def test_each_phase_compiles_once_and_skips_what_it_does_not_need(digits_teacher):
    c = config_with(digits_teacher, 'adadfq', **{'warmup_epochs': 2, 'calibration_epochs': 1})
    setup, variables = make_setup(c)
    phases = [step.phase_of(setup, e) for e in range(4)]
    assert phases == [step.Phase(True, False), step.Phase(False, False), step.Phase(False, True), step.Phase(False, True)]
    state = step.init_states(setup, variables, 0, 1, parallel.make_mesh(jax.devices()[:1]))
    one = jax.tree.map(lambda a: a[0], state)

    def count(phase, *primitives):
        """How many `primitives` the phase's iteration traces (its jaxpr, nested ones included):
        what the phase computes at all, before XLA fuses, merges or prints anything."""
        def walk(jaxpr):
            for eqn in jaxpr.eqns:
                yield eqn.primitive.name
                for param in eqn.params.values():
                    for sub in param if isinstance(param, (tuple, list)) else [param]:
                        sub = getattr(sub, 'jaxpr', sub)        # a ClosedJaxpr's Jaxpr
                        if hasattr(sub, 'eqns'):
                            yield from walk(sub)
        jaxpr = jax.make_jaxpr(lambda s: step.train_iteration(setup, s, variables, jnp.int32(0), phase))(one).jaxpr
        return sum(name in primitives for name in walk(jaxpr))

    student_convs = 9      # depth 8: the first conv, two per unit, two 1x1 shortcuts
    convs = {phase: count(phase, 'conv_general_dilated') for phase in set(phases)}
    # While calibrating, the student step runs its own forward; afterwards it reuses the generator
    # step's.
    assert convs[step.Phase(True, False)] - convs[step.Phase(False, False)] == student_convs
    # Only a training student has a backward pass of its own: an input and a kernel cotangent
    # through every conv (during warm-up the student's parameters' VJP is not even traced).
    assert convs[step.Phase(False, True)] - convs[step.Phase(False, False)] == 2 * student_convs
    # Frozen ranges are not reduced: the calibrating program has more min/max reductions.
    minmax = lambda phase: count(phase, 'reduce_min', 'reduce_max')
    assert minmax(step.Phase(True, False)) > minmax(step.Phase(False, False)) == minmax(step.Phase(False, True))
    epoch_fn = layouts.make_train_epoch(setup, parallel.make_mesh(jax.devices()[:1]), 1, loop='python')
    teacher_vars = parallel.replicate(variables, parallel.make_mesh(jax.devices()[:1]))
    for epoch in range(4):
        state, _ = epoch_fn(state, teacher_vars, jnp.int32(epoch))
    assert epoch_fn.programs() == 3


def run_iteration(setup, variables, state, epoch):
    return jax.jit(lambda s: step.train_iteration(setup, s, variables, jnp.int32(epoch), step.phase_of(setup, epoch)))(state)


@pytest.mark.parametrize('method,updates_per_iteration', [('adadfq', 2), ('bag', 2), ('gdfq', 1)])
def test_warmup_calibration_then_finetuning(digits_teacher, method, updates_per_iteration):
    setup, variables = make_setup(config_with(digits_teacher, method, **{'quant.range_rule': 'reference'}))
    state = step.init_state(setup, variables, seed=0)
    assert trees_equal(state.stu_params, variables['params'])            # Q starts as the teacher

    # Epoch 0: ranges calibrate (one update per student forward), only the generator steps.
    after, m = run_iteration(setup, variables, state, 0)
    beta_t = after.stu_quant_stats['init_block']['act_quant']['beta_t']
    np.testing.assert_allclose(beta_t, 0.9**updates_per_iteration, rtol=1e-6)
    assert trees_equal(after.stu_params, state.stu_params)
    assert trees_equal(after.stu_opt_state, state.stu_opt_state)
    assert not trees_equal(after.gen_params, state.gen_params)
    assert all(np.isfinite(float(v)) for v in m.values())

    # Epoch 1 (after warm-up and calibration): ranges frozen, the student steps too.
    later, _ = run_iteration(setup, variables, after, 1)
    assert trees_equal(later.stu_quant_stats, after.stu_quant_stats)
    assert not trees_equal(later.stu_params, after.stu_params)
    assert int(later.step) == 2


def test_generator_learns_through_the_student_only_in_adadfq(digits_teacher):
    """AdaDFQ's L_G reaches G through Q's fake quantizers (docs/algorithms.md 9.11); GDFQ's does not use Q."""
    for method, depends in [('adadfq', True), ('gdfq', False)]:
        setup, variables = make_setup(config_with(digits_teacher, method))
        state = step.init_state(setup, variables, seed=0)
        other = state.replace(stu_params=jax.tree.map(lambda p: p * 1.5, state.stu_params))
        a, _ = run_iteration(setup, variables, state, 0)
        b, _ = run_iteration(setup, variables, other, 0)
        assert trees_equal(a.gen_params, b.gen_params) != depends


def test_one_program_for_every_epoch_and_sharding_gives_the_single_device_result(digits_teacher):
    c = config_with(digits_teacher, 'bag')
    setup, variables = make_setup(c)
    # Four devices with the accelerators' lax.scan loop, one device with the CPU's Python loop.
    placements = {'four': (jax.devices(), 'scan'), 'one': (jax.devices()[:1], 'python')}
    assert len(jax.devices()) == 4
    # One step from the same state, whatever the sharding: the quantized step where its inputs
    # bound it, the losses and gradients of the global batch without quantizers to rounding
    # (tests/trajectories.py: assert_layouts_close).
    float_setup, _ = make_setup(trajectories.float_config(c))
    one_step = lambda s, name, **kw: trajectories.dfq_one_step(s, variables, parallel.make_mesh(placements[name][0]),
                                                              loop=placements[name][1], **kw)
    trajectories.assert_layouts_close((one_step(setup, 'four', finetune=False), one_step(setup, 'one', finetune=False)),
                                      (one_step(float_setup, 'four', student_noise=trajectories.FLOAT_STUDENT_NOISE),
                                       one_step(float_setup, 'one', student_noise=trajectories.FLOAT_STUDENT_NOISE)),
                                      c.batch_size,
                                      c.quant.a_bits)
    # Three epochs (calibration, then fine-tuning past the lr milestone): one program each, and
    # the same student within the spread that training amplifies rounding to.
    results = {}
    for name, (devices, loop) in placements.items():
        mesh = parallel.make_mesh(devices)
        state = step.init_states(setup, variables, 0, 1, mesh)
        epoch_fn = layouts.make_train_epoch(setup, mesh, num_seeds=1, loop=loop)
        teacher_vars = parallel.replicate(variables, mesh)
        for epoch in range(3):
            state, _ = epoch_fn(state, teacher_vars, jnp.int32(epoch))
        assert epoch_fn.programs() == 2, 'not one program per phase'   # calibration, fine-tuning
        results[name] = parallel.to_host(state)
    four, one = results['four'], results['one']
    assert int(four.step[0]) == int(one.step[0]) == 3 * c.iters_per_epoch
    trajectories.assert_rounding_close(trajectories.flat(four.stu_params), trajectories.flat(one.stu_params),
                                       trajectories.WHOLE_RUN_STUDENT_SPREAD)
    trajectories.assert_ranges_close(trajectories.flat(four.stu_quant_stats), trajectories.flat(one.stu_quant_stats),
                                     trajectories.WHOLE_RUN_RANGE_SPREAD, c.quant.a_bits)


def test_seeds_in_one_program_match_separate_runs(digits_teacher):
    c = config_with(digits_teacher, 'adadfq')
    setup, variables = make_setup(c)
    mesh = parallel.make_mesh()
    setups = {'quantized': setup, 'float': make_setup(trajectories.float_config(c))[0]}
    # Two seeds vmapped inside one scanned program (the accelerator path) against one seed at a
    # time (the CPU path), from the same states: the quantized calibration step where its inputs
    # bound it, one step of each phase without quantizers to rounding (assert_layouts_close).
    one_step = lambda kind, **kw: trajectories.dfq_one_step(
        setups[kind], variables, mesh, finetune=kind == 'float',
        student_noise=trajectories.FLOAT_STUDENT_NOISE if kind == 'float' else 0.0, **kw)
    both = {kind: one_step(kind, first_seed=3, num_seeds=2, loop='scan') for kind in setups}
    for k, seed in enumerate([3, 4]):
        alone = {kind: one_step(kind, first_seed=seed, num_seeds=1, loop='python') for kind in setups}
        mine = lambda kind: {name: v[k:k + 1] for name, v in both[kind].items()}
        trajectories.assert_layouts_close((mine('quantized'), alone['quantized']), (mine('float'), alone['float']),
                                          c.batch_size, c.quant.a_bits, f'seed {seed}: ')
    for kind in setups:
        gradient = both[kind]['calibrate/generator_gradient/l1/kernel']
        assert not np.allclose(gradient[0], gradient[1]), f'the two seeds trained alike ({kind})'


@pytest.mark.parametrize('method', ['gdfq', 'adadfq', 'bag'])
def test_end_to_end(digits_teacher, tmp_path, method):
    c = config_with(digits_teacher, method)
    summary = experiment.run(c, str(tmp_path))
    with open(tmp_path / 'summary.json') as f:
        assert json.load(f) == summary
    for key in ('method', 'w_bits', 'a_bits', 'teacher_top1', 'ptq_top1', 'best_top1', 'best_epoch', 'last_top1',
                'epochs', 'iterations', 'wall_s', 'devices'):
        assert key in summary
    assert summary['method'] == method and summary['iterations'] == 4 and summary['devices'] == 4
    assert summary['teacher_top1'] == pytest.approx(checkpoint.load_teacher(digits_teacher)[2]['top1'])
    lines = [m for m in metrics.read_metrics(str(tmp_path)) if m['phase'] == method]
    assert [m['step'] for m in lines] == [1, 2]
    top1 = [m['top1'] for m in lines]
    assert (summary['best_top1'], summary['best_epoch']) == (max(top1), 1 + top1.index(max(top1)))
    assert summary['last_top1'] == top1[-1] and summary['ptq_top1'] == top1[c.warmup_epochs - 1]
    # The student does not train in the warm-up epoch; then the rate is past the milestone (1).
    assert [m['lr_student'] for m in lines] == pytest.approx([0.0, c.student.lr * c.lr_decay])
    assert sorted(os.listdir(tmp_path / 'images')) == ['epoch_0001.png', 'epoch_0002.png']
    # The student checkpoint evaluates to the last epoch's accuracy.
    e = evaluate_config.get_config()
    e.checkpoint = str(tmp_path / 'student')
    assert experiment.run(e, str(tmp_path / 'eval'))['top1'] == pytest.approx(summary['last_top1'])


def test_interrupted_run_resumes_exactly(digits_teacher, tmp_path, monkeypatch):
    c = config_with(digits_teacher, 'bag', epochs=3)
    reference = dfq.train_and_evaluate(settings.parse(c), str(tmp_path / 'a'))

    interrupted(monkeypatch, lambda: dfq.train_and_evaluate(settings.parse(c), str(tmp_path / 'b')), epoch=2, phase='bag')
    resumed = dfq.train_and_evaluate(settings.parse(c), str(tmp_path / 'b'))
    for key in ('best_top1', 'last_top1', 'ptq_top1', 'best_epoch'):
        assert resumed[key] == reference[key]
    a = checkpoint.load_model(str(tmp_path / 'a' / 'student'))[2]
    b = checkpoint.load_model(str(tmp_path / 'b' / 'student'))[2]
    jax.tree.map(np.testing.assert_array_equal, a, b)
    # Started once more, the finished run trains nothing and keeps its student.
    assert dfq.train_and_evaluate(settings.parse(c), str(tmp_path / 'b')) == resumed


def test_non_finite_loss_stops_with_the_epoch_and_the_loss(digits_teacher, tmp_path, monkeypatch):
    c = config_with(digits_teacher, 'adadfq')
    monkeypatch.setattr(losses, 'adadfq_student_loss', lambda *a, **k: jnp.float32(jnp.nan))
    with pytest.raises(FloatingPointError, match=r'epoch 1: loss_s is \[nan\].*none yet'):
        dfq.train_and_evaluate(settings.parse(c), str(tmp_path))


def test_bad_configs_fail_before_compiling(digits_teacher, tmp_path):
    cases = [
        ({'method': 'zeroq'}, "method='zeroq' is not allowed: choose one of 'gdfq', 'adadfq', 'bag'"),
        ({'quant.w_bits': 0}, 'quant.w_bits=0 is not a valid bit-width'),
        ({'quant.a_bits': 17}, 'quant.a_bits=17'),
        ({'batch_size': 6}, 'batch_size=6 does not split over 4 devices'),
        ({'loss.channel_attention_layers': 'all'}, 'loss.channel_attention_layers'),
        ({'warmup_epochs': 5}, 'warmup_epochs=5'),
        ({'sweep': {'quant.w_bits': (3, 4)}}, "sweep field 'quant.w_bits' cannot be swept"),
        ({'num_seeds': 3, 'data_parallel': 2}, r'3 run\(s\) do not spread evenly over 2 groups'),
    ]
    def must_not_run(*args, **kwargs):
        raise AssertionError('loaded data or compiled before the config was checked')
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jax, 'jit', must_not_run)
        patch.setattr(data, 'load_dataset', must_not_run)
        for overrides, message in cases:
            with pytest.raises(ValueError, match=message):
                experiment.run(config_with(digits_teacher, 'bag', **overrides), str(tmp_path))
    assert not os.listdir(tmp_path)


GENERATOR_BATCHES = []


class RecordingGenerator(Generator):
    """The generator, recording the batch size of every call it is traced for."""

    def __call__(self, z, y, calibrate=False):
        GENERATOR_BATCHES.append(z.shape[0])
        return super().__call__(z, y, calibrate)


def test_image_grid_of_a_hundred_classes_in_batches(digits_teacher):
    info = data.DatasetInfo(name='many', num_classes=100, image_shape=(8, 8, 1), mean=(0.5,), std=(0.25,),
                            augment='none')
    teacher_model = ResNetCifar(num_classes=100, depth=8)
    setup = step.build_setup(settings.parse(config_with(digits_teacher, 'bag')).dfq, teacher_model, info)
    g = setup.generator
    setup = dataclasses.replace(setup, generator=RecordingGenerator(
        num_classes=g.num_classes, image_shape=g.image_shape, latent_dim=g.latent_dim, quant=g.quant))
    teacher_variables = teacher_model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
    state = step.init_states(setup, teacher_variables, 0, 1, parallel.make_mesh())
    GENERATOR_BATCHES.clear()
    grid = dfq.make_image_grid(setup, seed=0, chunk=32)(state)
    # 10 rows of 8: the 80 images in the largest batch size up to 32 that divides 80, traced once.
    assert GENERATOR_BATCHES == [20]
    assert grid.shape == (10 * 9, dfq.GRID_PER_CLASS * 9, 3)
    cells = grid.reshape(10, 9, dfq.GRID_PER_CLASS, 9, 3)[:, :8, :, :8]
    assert np.all(cells.max(axis=(1, 3, 4)) == 255), 'an empty cell in the grid'


def test_large_images_warn_with_the_expected_memory(digits_teacher, caplog):
    c = config_with(digits_teacher, 'bag')
    for size, warns in ((32, False), (64, False), (96, True)):
        info = data.DatasetInfo(name='big', num_classes=10, image_shape=(size, size, 3), mean=(0.5,) * 3,
                                std=(0.25,) * 3, augment='none')
        setup = step.build_setup(settings.parse(c).dfq, ResNetCifar(num_classes=10, depth=8), info)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            estimate = dfq.warn_about_memory(setup, info)
        assert (estimate is not None) == warns == ('needs about' in caplog.text)
    # The generator's first layer alone: 100 x 128 x 24 x 24 weights, value, gradient and Adam's two moments.
    assert estimate > 4 * 4 * 100 * 128 * 24 * 24 + dfq.RUNTIME_BYTES
    assert f'{estimate / 1e9:.1f} GB' in caplog.text and '96x96 images are larger than 4096 pixels' in caplog.text


def test_teacher_that_does_not_fit_the_data(digits_teacher, tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / 'three_classes.npz'
    np.savez(path, x_train=rng.integers(0, 256, (30, 8, 8), np.uint8), y_train=np.arange(30) % 3,
             x_test=rng.integers(0, 256, (9, 8, 8), np.uint8), y_test=np.arange(9) % 3)
    c = config_with(digits_teacher, 'bag', **{'data.name': 'npz', 'data.npz_path': str(path)})
    with pytest.raises(ValueError, match=r"teacher.checkpoint was made for 'digits' \(10 classes.*has 3 classes"):
        dfq.train_and_evaluate(settings.parse(c), str(tmp_path / 'w'))


def test_one_command_trains_the_teacher_first(tmp_path):
    c = tiny_config('bag')
    assert c.teacher.checkpoint is None
    summary = experiment.run(c, str(tmp_path))
    teacher_meta = checkpoint.load_teacher(str(tmp_path / 'teacher'))[2]
    assert summary['teacher_top1'] == pytest.approx(teacher_meta['top1'])
    phases = [m['phase'] for m in metrics.read_metrics(str(tmp_path))]
    assert phases == ['teacher', 'teacher', 'bag', 'bag']


def test_several_seeds_report_each_and_mean_std(digits_teacher, tmp_path):
    summary = dfq.train_and_evaluate(settings.parse(config_with(digits_teacher, 'bag', num_seeds=2, seed=5)), str(tmp_path))
    per_seed = summary['per_seed']
    assert per_seed['seed'] == [5, 6] and summary['num_seeds'] == 2
    assert summary['best_top1']['mean'] == pytest.approx(np.mean(per_seed['best_top1']))
    assert summary['last_top1']['std'] == pytest.approx(np.std(per_seed['last_top1'], ddof=1))
    for seed in (5, 6):
        assert checkpoint.load_model(str(tmp_path / dfq.STUDENTS_DIR / f'seed{seed}'))[0] == 'student'
    assert [r['seed'] for r in summary['runs']] == [5, 6] and len(summary['groups']) == 1

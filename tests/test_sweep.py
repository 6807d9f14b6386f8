"""Many runs in one program: seeds and sweeps on a ('runs', 'data') mesh of 4 CPU devices."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bag_jax import checkpoint, dfq, experiment, layouts, metrics, parallel, report, settings, step, sweep
from tests import trajectories
from tests.conftest import interrupted, tiny_config
from tests.dfq_setup import config_with, make_setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_runs_are_the_product_of_the_sweep_values_times_the_seeds():
    c = tiny_config('bag')
    c.seed, c.num_seeds = 3, 2
    c.sweep = {'loss.channel_attention': (0, 5.0), 'student.lr': (1e-4, 1e-3, 1e-2)}
    runs = list(settings.parse(c).dfq.runs)
    assert len(runs) == 12 and [r.seed for r in runs[:4]] == [3, 4, 3, 4]
    assert runs[0].overrides == (('loss.channel_attention', 0.0), ('student.lr', 1e-4))
    assert runs[-1].name == 'loss.channel_attention=5,student.lr=0.01_seed4'
    hp = settings.parse(c).dfq.swept_values()
    np.testing.assert_array_equal(hp['student.lr'], np.float32([1e-4, 1e-4, 1e-3, 1e-3, 1e-2, 1e-2] * 2))
    # Each run alone: its seed and its values, no sweep.
    alone = settings.run_configs(c)[5]
    assert (alone.seed, alone.num_seeds, alone.sweep, alone.student.lr, alone.loss.channel_attention) == (
        4, 1, None, 1e-2, 0.0)
    # No sweep: the seeds alone, and no traced hyperparameters (a single run's program is today's).
    c.sweep = None
    assert [r.name for r in list(settings.parse(c).dfq.runs)] == ['seed3', 'seed4'] and settings.parse(c).dfq.swept_values() == {}


@pytest.mark.parametrize('sweep_value, message', [
    ({'quant.w_bits': (3, 4)}, "sweep field 'quant.w_bits' cannot be swept: .*Bit-widths, method, batch size"),
    ({'batch_size': (8, 16)}, "sweep field 'batch_size' cannot be swept"),
    ({'method': ('gdfq', 'bag')}, "sweep field 'method' cannot be swept"),
    ({'teacher.depth': (8, 20)}, "sweep field 'teacher.depth' cannot be swept"),
    ({'loss.chanel_attention': (0, 5)}, r"'loss.chanel_attention' cannot be swept \(there is no such config field\)"),
    ({'student.lr': ()}, r"sweep\['student.lr'\]=\(\) is not allowed: use a non-empty list"),
    ({'student.lr': ('a', 'b')}, 'every value must be a number'),
    ({'student.lr': (0.1, 0.1)}, 'repeats a value'),
    ('student.lr', 'use a dict of dotted config fields'),
    ({'student.lr': (0.1, -1)}, 'in a run of the sweep: student.lr=-1.0 is not allowed: use a number greater than 0'),
    ({'loss.lambda_l': (0.1, 0.9)}, 'in a run of the sweep: loss.lambda_l=0.9 is above loss.lambda_u=0.8'),
])
def test_sweeps_that_would_change_the_program_are_refused(sweep_value, message):
    c = tiny_config('bag')
    c.sweep = sweep_value
    with pytest.raises(ValueError, match=message):
        settings.parse(c)


def test_device_split_defaults_and_refusals():
    c = tiny_config('bag')      # batch 8
    split = lambda runs, devices, data_parallel=None: sweep.device_split(c.batch_size, data_parallel, runs, devices)
    assert split(1, 4) == (1, 4)              # one run: all devices, today's mesh
    assert split(2, 4) == (2, 2) and split(4, 4) == (4, 1) and split(8, 4) == (4, 1)   # runs first
    assert split(3, 4) == (1, 4)              # 3 runs cannot spread over 4 devices: they share them
    assert split(4, 4, data_parallel=2) == (2, 2)
    with pytest.raises(ValueError, match=r'data_parallel=3 does not divide the 4 devices: use data_parallel in \[1, 2, 4\]'):
        split(4, 4, data_parallel=3)
    with pytest.raises(ValueError, match=r'1 run\(s\) do not spread evenly over 2 groups of data_parallel=2'):
        split(1, 4, data_parallel=2)
    with pytest.raises(ValueError, match=r'batch_size=8 does not split over 16 devices per run \(data_parallel\)'):
        split(1, 16, data_parallel=16)
    with pytest.raises(ValueError, match=r'3 runs \(sweep points x num_seeds\) at batch_size=6 do not split over 4 '
                                         r'.* a multiple of 2, or batch_size a multiple of 4'):
        sweep.device_split(6, None, 3, 4)
    # run.py checks it before anything is loaded, naming the field.
    bad = _with(c, num_seeds=1, data_parallel=2)
    with pytest.raises(ValueError, match=r'over 2 groups of data_parallel=2 devices .*: use data_parallel in \[4\]'):
        settings.check_device_split(settings.parse(bad), 4)


def _with(c, **fields):
    c = c.copy_and_resolve_references()
    for key, value in fields.items():
        c[key] = value
    return c


def test_two_runs_on_two_rows_match_each_run_alone_on_two_devices(digits_teacher):
    """A 2 runs x 2 data mesh (shard_map over 'runs'), with the CPU's Python loop and the
    accelerators' scan, against each run trained alone on 2 devices, from the same states: the
    quantized calibration step where its inputs bound it, one step of each phase without
    quantizers to rounding (tests/trajectories.py: assert_layouts_close). Also 4 runs on the 2
    rows (two runs per row, each computed on its own)."""
    c = config_with(digits_teacher, 'bag')
    c.sweep = {'loss.channel_attention': (0.0, 5.0), 'student.lr': (1e-4, 1e-2)}
    configs = {'quantized': c, 'float': trajectories.float_config(c)}
    setups = {kind: make_setup(config)[0] for kind, config in configs.items()}
    noise = {'quantized': 0.0, 'float': trajectories.FLOAT_STUDENT_NOISE}
    _, variables = make_setup(c)
    runs, hp = list(settings.parse(c).dfq.runs), settings.parse(c).dfq.swept_values()
    two_rows = parallel.make_mesh(runs=2)
    assert two_rows.shape == {'runs': 2, 'data': 2}
    alone = {}   # the runs without and with channel attention, at the low and the high rate
    for k in (0, 3):
        for kind, config in configs.items():
            run_config = settings.run_configs(config)[k]
            alone[kind, k] = trajectories.dfq_one_step(make_setup(run_config)[0], variables,
                                                       parallel.make_mesh(jax.devices()[:2]),
                                                       first_seed=run_config.seed, finetune=kind == 'float',
                                                       student_noise=noise[kind])
    for loop, picked in (('python', [0, 3]), ('scan', [3, 0]), ('python', [0, 1, 2, 3])):
        together = {kind: trajectories.dfq_one_step(setups[kind], variables, two_rows, loop=loop,
                                                    seeds=[runs[k].seed for k in picked],
                                                    hparams={f: v[picked] for f, v in hp.items()},
                                                    finetune=kind == 'float', student_noise=noise[kind])
                    for kind in setups}
        for i, k in ((i, k) for i, k in enumerate(picked) if k in (0, 3)):
            # A run without channel attention computes none alone; in the sweep it computes the
            # term (its metric) and weighs it 0.
            mine = lambda kind: {name: v[i:i + 1] for name, v in together[kind].items()
                                 if not (name.endswith('/channel_attention') and runs[k].overrides[0][1] == 0)}
            its = lambda kind: {name: alone[kind, k][name] for name in mine(kind)}
            trajectories.assert_layouts_close((mine('quantized'), its('quantized')), (mine('float'), its('float')),
                                              c.batch_size, c.quant.a_bits, f'{loop}, {runs[k].name}: ')
    gradient = next(v for name, v in together['float'].items() if name.startswith('finetune/student_gradient/'))
    assert not np.allclose(gradient[1], gradient[2]), 'the runs trained alike'


def test_runs_on_cpu_stay_unbatched_programs(digits_teacher):
    """On CPU the runs of a row are computed each on its own, so every convolution is the plain
    single-run one (feature_group_count 1): vmapped runs would batch the kernels into grouped
    convolutions, which XLA:CPU runs several times slower. The scanned (accelerator) program
    of the same 4 runs on 2 rows is vmapped, and shows them."""
    c = config_with(digits_teacher, 'adadfq')
    setup, variables = make_setup(c)
    mesh = parallel.make_mesh(runs=2)
    state = step.init_states(setup, variables, 0, 4, mesh)
    teacher_variables = parallel.replicate(variables, mesh)

    def groups(loop):
        program = layouts.make_train_epoch(setup, mesh, 4, loop).program(step.phase_of(setup, 1))
        text = program.lower(state, teacher_variables, jnp.int32(1)).as_text()
        return set(re.findall(r'feature_group_count = (\d+)', text))
    assert groups('python') == {'1'}
    assert groups('scan') == {'1', '2'}


def test_a_sweep_gives_each_run_the_results_of_that_run_alone(digits_teacher, tmp_path, monkeypatch, capsys):
    """loss.channel_attention in (0, 5), interrupted and resumed, against the two runs alone:
    the same accuracies to the spread that training amplifies rounding to; and what it writes."""
    c = config_with(digits_teacher, 'bag', **{'quant.w_bits': 8, 'quant.a_bits': 8, 'epochs': 3})
    c.sweep = {'loss.channel_attention': (0.0, 5.0)}
    workdir = str(tmp_path / 'sweep')
    interrupted(monkeypatch, lambda: experiment.run(c, workdir), epoch=2, phase='bag')
    summary = experiment.run(c, workdir)
    printed = capsys.readouterr().out
    alone = [experiment.run(run_config, str(tmp_path / f'alone{k}'))
             for k, run_config in enumerate(settings.run_configs(c))]
    assert summary['num_runs'] == 2 and summary['sweep'] == {'loss.channel_attention': [0.0, 5.0]}
    for run, single in zip(summary['runs'], alone):
        for key in ('ptq_top1', 'best_top1', 'last_top1'):
            assert abs(run[key] - single[key]) <= trajectories.WHOLE_RUN_ACCURACY_SPREAD, (run['name'], key)
    assert [r['name'] for r in summary['runs']] == ['loss.channel_attention=0_seed0', 'loss.channel_attention=5_seed0']
    assert [g['overrides'] for g in summary['groups']] == [{'loss.channel_attention': 0.0},
                                                             {'loss.channel_attention': 5.0}]
    assert summary['groups'][1]['best_top1'] == {'mean': summary['runs'][1]['best_top1'], 'std': 0.0}
    assert 'best_top1' not in summary, 'a sweep has no single accuracy'
    # Each run's student, under its name, scores its last epoch.
    for run in summary['runs']:
        directory = os.path.join(workdir, dfq.STUDENTS_DIR, run['name'])
        kind, _, _, meta = checkpoint.load_model(directory)
        assert kind == 'student' and meta['overrides'] == run['overrides'] and meta['top1'] == run['last_top1']
    # metrics.jsonl: every epoch once (the resumed one included), each run's accuracy.
    lines = [m for m in metrics.read_metrics(workdir) if m['phase'] == 'bag']
    assert [m['step'] for m in lines] == [1, 2, 3]
    assert [lines[-1][f'top1/{r["name"]}'] for r in summary['runs']] == [r['last_top1'] for r in summary['runs']]
    # The table printed at the end, and again by bag_jax.report from the files.
    table = sweep.markdown_table(summary['groups'])
    assert table in printed and '| loss.channel_attention | seeds | ptq_top1 |' in table
    out = subprocess.run([sys.executable, '-m', 'bag_jax.report', workdir, str(tmp_path / 'alone0')], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert table in out and f'{alone[0]["best_top1"]:.2f}' in out


def test_report_prints_the_groups_and_says_what_is_missing(tmp_path):
    runs = [{'overrides': {}, 'seed': seed, 'ptq_top1': ptq, 'best_top1': best, 'best_epoch': epoch, 'last_top1': last}
            for seed, ptq, best, epoch, last in ((0, 19.0, 49.0, 300, 48.0), (1, 21.0, 51.0, 310, 50.0))]
    summary = {'method': 'bag', 'w_bits': 3, 'a_bits': 3, 'teacher_top1': 70.0, 'epochs': 400, 'num_runs': 2,
               'groups': sweep.groups_of(runs)}
    (tmp_path / 'summary.json').write_text(json.dumps(summary))
    assert report.format_summary(report.read_summary(str(tmp_path))) == (
        'bag W3A3, teacher 70.00 %, 2 run(s), 400 epochs\n\n' + sweep.markdown_table(summary['groups']))
    assert '| 0, 1 | 20.00 ± 1.41 | 50.00 ± 1.41 | 305.0 ± 7.1 | 49.00 ± 1.41 |' in report.format_summary(summary)
    os.remove(tmp_path / 'summary.json')
    assert report.main(['report', str(tmp_path)]) == 1
    (tmp_path / 'summary.json').write_text(json.dumps({'top1': 90.0}))
    with pytest.raises(ValueError, match='not the summary of a quantization run'):
        report.read_summary(str(tmp_path))


def test_a_diverged_run_is_left_behind_and_the_others_go_on(digits_teacher, tmp_path):
    """student.lr = 1e30 sends one run's student to inf in its first fine-tuning iteration: that
    run is marked diverged in epoch 2, its results count epoch 1 only, and the other run finishes
    as usual. When every run has diverged the program stops, as a single run does."""
    c = config_with(digits_teacher, 'adadfq')
    c.sweep = {'student.lr': (1e-4, 1e30)}
    summary = dfq.train_and_evaluate(settings.parse(c), str(tmp_path / 'one'))
    ok, diverged = summary['runs']
    assert ok['diverged_epoch'] is None and ok['last_top1'] is not None
    assert diverged['diverged_epoch'] == 2 and diverged['last_top1'] is None and diverged['best_epoch'] == 1
    assert [g['diverged'] for g in summary['groups']] == [0, 1]
    assert '| diverged |' in sweep.markdown_table(summary['groups'])
    line = metrics.read_metrics(str(tmp_path / 'one'))[-1]
    assert np.isfinite(line['loss_s']) and line['top1'] == line[f'top1/{ok["name"]}']   # the finite run's
    assert checkpoint.load_model(str(tmp_path / 'one' / dfq.STUDENTS_DIR / diverged['name']))[3]['diverged_epoch'] == 2
    c.sweep = {'student.lr': (1e29, 1e30)}
    with pytest.raises(FloatingPointError, match=r'epoch 2: .* \(not finite\). Stopped; the last good checkpoint '
                                                 r'\(after epoch 1\)'):
        dfq.train_and_evaluate(settings.parse(c), str(tmp_path / 'both'))


def test_the_command_line_takes_a_sweep_as_json(tmp_path):
    """`--config.sweep=JSON` reaches the config as a dict (here refused for its field, which
    proves it was read, before anything is loaded)."""
    out = subprocess.run([sys.executable, 'run.py', '--config=tests/tiny_config.py', f'--workdir={tmp_path / "w"}',
                          '--config.sweep={"quant.w_bits": [3, 4], "student.lr": [0.1]}'], cwd=ROOT,
                         capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("run.py: error: sweep field 'quant.w_bits' cannot be swept")


@pytest.mark.parametrize('sweep_value, message', [
    ({'student.lr': (1e-4, float('inf'))}, r"sweep\['student.lr'\]=\[0.0001, inf\] is not allowed: every value must "
                                           r"be a finite number \(nan, inf and -inf are refused\)"),
    ({'loss.kd': (float('nan'),)}, r"sweep\['loss.kd'\]=\[nan\] is not allowed: every value must be a finite number"),
    ({'generator.lr': (-float('inf'), 1e-3)}, r"sweep\['generator.lr'\]=\[-inf, 0.001\] is not allowed"),
    # The command line leaves JSON it cannot read as a Python literal a string: it is read as JSON.
    ('{"student.lr": [0.1, NaN]}', r"sweep\['student.lr'\]=\[0.1, nan\] is not allowed: every value must be a "
                                   r"finite number"),
    ('{"student.lr": [0.1, Infinity]}', r"sweep\['student.lr'\]=\[0.1, inf\]"),
    ('{"generator.quantize": [true, false]}',
     r"sweep field 'generator.quantize' cannot be swept: it is a boolean field, and True/False switches a part of "
     r"the program on or off.*--config.generator.quantize=True, --config.generator.quantize=False.*A sweep varies "
     r"only the float hyperparameters of the step.*: loss.bns, .*student.lr, .*lr_decay"),
    ({'student.nesterov': (True, False)}, r"sweep field 'student.nesterov' cannot be swept: it is a boolean field"),
    ('{"student.lr": [true, false]}', r"sweep\['student.lr'\]=\[True, False\] is not allowed: every value must be a "
                                      r"number \(True and False are not"),
    ('{"student.lr": [0.1, 1e-3}', r"sweep='.*' is not allowed: it is not a dict, and as JSON it does not parse "
                                   r"\(.*\): use a dict of dotted config fields"),
])
def test_sweep_values_must_be_finite_and_boolean_fields_are_told_why(sweep_value, message):
    c = tiny_config('bag')
    c.sweep = sweep_value
    with pytest.raises(ValueError, match=message):
        settings.parse(c)


def test_the_command_line_tells_a_boolean_sweep_why(tmp_path):
    """`--config.sweep={"generator.quantize": [true, false]}` was told to use a dict of dotted
    config fields, which it is: the message says that boolean fields cannot be swept."""
    out = subprocess.run([sys.executable, 'run.py', '--config=tests/tiny_config.py', f'--workdir={tmp_path / "w"}',
                          '--config.sweep={"generator.quantize": [true, false]}'], cwd=ROOT,
                         capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=300)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("run.py: error: sweep field 'generator.quantize' cannot be swept: it is a boolean field"), last
    assert not os.path.exists(tmp_path / 'w' / 'config.json')

"""`python -m bag_jax.reproduce` and `bench/accuracy.py`: the runs they plan, a real digits
benchmark end to end (two presets of two seeds, tiny schedule, the session's teacher), resuming
by skipping finished runs, the clear errors, and the tables' formatting."""

import json
import os
import re

import numpy as np
import pytest

from bag_jax import cli, experiment, methods, report, reproduce
from tests.conftest import CACHE_ENV

# configs/digits_w3a3.py at tests/tiny_config.py's sizes (2 epochs of 2 iterations at batch 8), both
# epochs calibrating, so that each preset compiles one training program (what is tested here is
# the command around the runs, not the fine-tuning, which tests/test_dfq.py runs).
TINY = ('--config.epochs=2', '--config.iters_per_epoch=2', '--config.warmup_epochs=2', '--config.calibration_epochs=2',
        '--config.lr_milestones=(1,)', '--config.batch_size=8', '--config.generator.latent_dim=16',
        '--config.image_grid_every=0')


@pytest.fixture
def quiet_console(monkeypatch):
    """The command's console setup left out: the session keeps its logging and its compilation cache."""
    monkeypatch.setattr(reproduce, 'configure_console', lambda verbosity: None)
    for key, value in CACHE_ENV.items():
        monkeypatch.setenv(key, value)


def _cell(value):
    """What the table should show for a summary value, computed here independently."""
    return f'{value["mean"]:.2f} ± {value["std"]:.2f}' if isinstance(value, dict) else f'{value:.2f}'


def _rows(text):
    return [[c.strip() for c in line.strip().strip('|').split('|')] for line in text.splitlines()
            if line.startswith('| ') and not line.startswith('| ---')]


def test_plan_runs_every_preset_and_bit_width_from_one_teacher(monkeypatch):
    jobs = reproduce.plan('cifar100', 'runs/r', ['gdfq', 'bag'], [3, 4], 2,
                          ['--config.data.tfds_dir=/data', '--config.epochs=5'])
    teacher, runs = jobs[0], jobs[1:]
    assert teacher.mode == 'teacher' and os.path.basename(teacher.config_file) == 'cifar100_teacher.py'
    assert teacher.workdir == os.path.join('runs', 'r', 'cifar100', 'teacher')
    assert teacher.overrides == ('--config.data.tfds_dir=/data',), 'the quantization fields reach the teacher'
    assert [os.path.basename(j.workdir) for j in runs] == ['gdfq_w3a3', 'bag_w3a3', 'gdfq_w4a4', 'bag_w4a4']
    shared = f'--config.teacher.checkpoint={os.path.join("runs", "r", "cifar100", "teacher", "teacher")}'
    assert runs[3].command() == ('python run.py --config=configs/cifar100_w4a4.py:bag --workdir=runs/r/cifar100/bag_w4a4 '
                                 f'--config.num_seeds=2 --config.data.tfds_dir=/data --config.epochs=5 {shared}')
    # A config with a teacher: no teacher run. ImageNet: three networks at W4A4.
    jobs = reproduce.plan('imagenet', 'W', ['adadfq'], None, 3)
    assert [(os.path.basename(j.config_file), os.path.basename(j.workdir)) for j in jobs] == [
        (f'imagenet_{n}_w4a4.py', f'{n}_adadfq_w4a4') for n in ('resnet18', 'resnet50', 'mobilenetv2')]
    # Digits: other bit-widths as overrides. The presets are bag_jax.methods.METHODS when the command starts.
    monkeypatch.setattr(methods, 'METHODS', ('adadfq', 'bag'))
    jobs = reproduce.plan('digits', 'W', bits=[3, 4], overrides=['--config.teacher.checkpoint=T'])
    assert [(j.preset, j.bits) for j in jobs] == [('adadfq', 3), ('bag', 3), ('adadfq', 4), ('bag', 4)]
    assert jobs[3].overrides == ('--config.quant.w_bits=4', '--config.quant.a_bits=4', '--config.num_seeds=3',
                                 '--config.teacher.checkpoint=T')
    # bench/accuracy.py: the presets of one config, each in WORKDIR/PRESET, from one teacher.
    jobs = reproduce.plan_presets('configs/digits_w3a3.py', 'A', ['bag', 'adadfq'], 2, ['--config.quant.w_bits=2'])
    assert [(j.mode, j.preset, os.path.basename(j.workdir)) for j in jobs] == [
        ('teacher', None, 'teacher'), ('quantize', 'bag', 'bag'), ('quantize', 'adadfq', 'adadfq')]
    assert jobs[0].overrides == ('--config.mode=teacher',)
    assert jobs[1].overrides[:2] == ('--config.num_seeds=2', '--config.quant.w_bits=2')


@pytest.mark.parametrize('argv, message', [
    (['mnist'], "unknown benchmark 'mnist': choose from cifar100, cifar10, imagenet, digits"),
    (['digits', '--methods', 'bag,gdfqq'], "unknown preset 'gdfqq': choose from " + ', '.join(methods.METHODS)),
    (['imagenet', '--bits', '3'], '--bits=3 is not allowed for imagenet: choose from 4'),
    (['cifar10', '--bits', '3,x'], "--bits='3,x' is not a comma-separated list of whole numbers"),
    (['digits', '--num_seeds', '0'], '--num_seeds=0 is not allowed'),
    (['digits', '--config.quant.w_bits=2'], '--config.quant.w_bits=2 cannot be given here: use --bits'),
    (['digits', '--config.epoch=2'], "unknown config field 'epoch': did you mean 'epochs'"),
])
def test_mistakes_are_one_line_naming_the_allowed_values(argv, message, capsys):
    assert reproduce.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith('python -m bag_jax.reproduce: error: ') and message in err and err.count('\n') == 1, err
    # The same through `bag-jax reproduce`.
    assert cli.main(['reproduce', *argv]) == 1
    assert capsys.readouterr().err.startswith('bag-jax reproduce: error: ')


def test_digits_end_to_end_then_finished_runs_are_read(digits_teacher, tmp_path, quiet_console, monkeypatch, capsys):
    argv = ['digits', '--workdir', str(tmp_path), '--methods', 'gdfq,bag', '--num_seeds', '2',
            f'--config.teacher.checkpoint={digits_teacher}', *TINY]
    assert reproduce.main(argv) == 0
    out = capsys.readouterr().out
    assert 'run 1 of 2, gdfq W3A3' in out and 'run 2 of 2, bag W3A3' in out
    assert f'python run.py --config=configs/digits_w3a3.py:bag --workdir={tmp_path}/digits/bag_w3a3' in out
    path = tmp_path / 'digits' / 'results.md'
    text = path.read_text()
    assert text.strip() in out
    rows = _rows(text)
    assert rows[0] == ['method', 'bits', 'seeds', 'teacher top-1', 'PTQ top-1', 'best top-1', 'last top-1',
                       'published top-1']
    summaries = {}
    for row, preset in zip(rows[1:], ('gdfq', 'bag'), strict=True):
        summary = summaries[preset] = report.read_summary(str(tmp_path / 'digits' / f'{preset}_w3a3'))
        assert (summary['method'], summary['num_seeds'], summary['iterations']) == (preset, 2, 4)
        assert isinstance(summary['best_top1'], dict), 'two seeds: mean and std'
        assert row == [preset, 'W3A3', '2', _cell(summary['teacher_top1']), _cell(summary['ptq_top1']),
                       _cell(summary['best_top1']), _cell(summary['last_top1']), '']
        assert re.fullmatch(r'\d+\.\d\d ± \d+\.\d\d', row[5])
    mtimes = {preset: os.stat(tmp_path / 'digits' / f'{preset}_w3a3' / 'summary.json').st_mtime_ns
              for preset in summaries}

    # Started again: nothing trains, the summaries are read, the table is the same.
    def no_run(*args, **kwargs):
        raise AssertionError('a finished run was started again')
    monkeypatch.setattr(experiment, 'run', no_run)
    assert reproduce.main(argv) == 0
    out = capsys.readouterr().out
    assert 'run 1 of 2, gdfq W3A3: finished in' in out and 'not started again' in out
    assert path.read_text() == text
    for preset, mtime in mtimes.items():
        assert os.stat(tmp_path / 'digits' / f'{preset}_w3a3' / 'summary.json').st_mtime_ns == mtime
    # A changed field is refused before any run starts, naming it.
    assert reproduce.main([*argv, '--config.student.lr=0.5']) == 1
    assert 'holds a run made with another config (student.lr: 0.0001 there, 0.5 now)' in capsys.readouterr().err


def test_a_missing_dataset_is_the_datasets_own_error(tmp_path, quiet_console, capsys):
    pytest.importorskip('tensorflow')
    missing = tmp_path / 'nope'
    argv = ['cifar10', '--workdir', str(tmp_path), '--methods', 'gdfq', '--bits', '3', f'--config.data.tfds_dir={missing}']
    assert reproduce.main(argv) == 1
    captured = capsys.readouterr()
    assert 'the shared teacher of the 1 run(s)' in captured.out
    assert captured.err.startswith(f"python -m bag_jax.reproduce: error: Dataset 'cifar10' could not be downloaded or "
                                   f"found: data.tfds_dir='{missing}' does not exist")
    assert f'--config.data.tfds_dir={missing}' in captured.err
    assert not (tmp_path / 'cifar10' / 'results.md').exists()


def test_tables_from_summaries():
    def summary(best, wall_s, iterations=100, seeds=3, diverged=0):
        return {'method': 'x', 'w_bits': 3, 'a_bits': 3, 'teacher_top1': 70.333, 'num_seeds': seeds,
                'ptq_top1': {'mean': 40.0, 'std': 1.5}, 'best_top1': best, 'last_top1': None, 'wall_s': wall_s,
                'iterations': iterations, 'devices': 1, 'groups': [{'diverged': diverged}]}
    rows = [('gdfq', summary({'mean': 47.6123, 'std': 0.4567}, 125.0)), ('bag', summary(56.0, 100.0, seeds=1)),
            ('adadfq', summary({'mean': 52.0, 'std': 0.0}, 4000.0, diverged=1))]
    table = _rows(reproduce.speed_table(rows))
    assert table[0] == ['method', 'seeds', 'best top-1', 'last top-1', 'PTQ top-1', 'wall time', 's / iteration',
                        'time vs bag']
    assert table[1] == ['gdfq', '3', '47.61 ± 0.46', 'n/a', '40.00 ± 1.50', '2 min 5 s', '1.25', '1.25']
    assert table[2] == ['bag', '1', '56.00', 'n/a', '40.00 ± 1.50', '1 min 40 s', '1', '1.00']
    assert table[3][5:] == ['1 h 6 min', '40', '40.00'] and table[3][1] == '3 (1 diverged)'
    assert _rows(reproduce.speed_table(rows[:1]))[0][-1] == 's / iteration', 'no bag: no relative column'
    markdown = reproduce.speed_markdown('configs/x.py', rows)
    assert markdown.startswith('# configs/x.py, W3A3, 3 seed(s) per preset, teacher top-1 70.33 %, 1 device(s)')
    assert 'includes evaluation' in markdown
    # The benchmark table: published numbers where known, empty cells elsewhere; diverged seeds counted.
    jobs = [reproduce.Job('f', 'w', preset=p, bits=3) for p in ('gdfq', 'bag', 'adadfq')]
    table = _rows(reproduce.results_table('cifar100', [(job, s) for job, (_, s) in zip(jobs, rows)]))
    assert [(r[0], r[2], r[3], r[-1]) for r in table[1:]] == [
        ('gdfq', '3', '70.33', '47.61'), ('bag', '1', '70.33', '56.14'), ('adadfq', '3 (1 diverged)', '70.33', '52.74')]
    assert _rows(reproduce.results_table('digits', [(jobs[1], rows[1][1])]))[1][-1] == ''
    imagenet = _rows(reproduce.results_table('imagenet', [(reproduce.Job('f', 'w', preset='synq', bits=4,
                                                                         network='resnet18'), rows[0][1])]))
    assert imagenet[0][:2] == ['network', 'method'] and (imagenet[1][:2], imagenet[1][-1]) == (['resnet18', 'synq'], '67.90')


def test_a_run_whose_every_seed_diverged_gets_a_row_from_the_epochs_before(digits_teacher, tmp_path):
    """dfq stops such a run without a summary; reproduce writes one from its metrics.jsonl: per
    seed the best top-1 before the divergence, PTQ at the end of the warm-up, no last top-1, and
    the table says so."""
    lines = [{'step': e + 1, 'phase': 'adadfq', 'top1': 0.0, 'epoch_s': 2.0, 'top1/seed0': a, 'top1/seed1': b}
             for e, (a, b) in enumerate([(10.0, 12.0), (40.0, 30.0), (35.0, 50.0)])]
    with open(tmp_path / 'metrics.jsonl', 'w') as f:
        f.write(''.join(json.dumps(line) + '\n' for line in lines))
    record = {'method': 'adadfq', 'quant': {'w_bits': 2, 'a_bits': 2}, 'teacher': {'checkpoint': digits_teacher},
              'num_seeds': 2, 'epochs': 40, 'warmup_epochs': 2, 'iters_per_epoch': 50}
    summary = reproduce.diverged_summary(str(tmp_path), record, 'epoch 4: bns is [nan, nan] (not finite)')
    assert summary['best_top1'] == pytest.approx({'mean': 45.0, 'std': np.std([40.0, 50.0], ddof=1)})
    assert summary['ptq_top1'] == pytest.approx({'mean': 35.0, 'std': np.std([40.0, 30.0], ddof=1)})
    assert summary['last_top1'] is None and summary['all_diverged_epoch'] == 4 and summary['wall_s'] == 6.0
    assert json.load(open(tmp_path / 'summary.json')) == summary
    row = _rows(reproduce.speed_table([('adadfq', summary)]))[1]
    assert row[:4] == ['adadfq', '2 (all diverged in epoch 4)', '45.00 ± 7.07', 'n/a']

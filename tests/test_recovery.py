"""Drills: runs killed at any point, damaged checkpoints, a changed config, two runs at once.

The kill drills run `python run.py` in subprocesses (tests/drill_worker.py kills them with
SIGKILL at chosen points, or the test kills them at random moments) and require the rerun to end
with the uninterrupted run's per-epoch results, bit for bit: it is the same program on the same
machine, resumed from the same state.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bag_jax import checkpoint, experiment, metrics, settings, workdir
from configs import evaluate as evaluate_config
from tests.conftest import CACHE_ENV, NUM_TEST_DEVICES, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRILL_WORKER = os.path.join(ROOT, 'tests', 'drill_worker.py')
# The tiny run at 8 bits, so that the student's accuracies carry information (at 3 bits the
# 4-iteration student scores at chance).
DRILL_FLAGS = ['--config=tests/tiny_config.py', '--config.quant.w_bits=8', '--config.quant.a_bits=8']
TIMEOUT_S = 300


def drill_config():
    c = tiny_config('bag')
    c.quant.w_bits = c.quant.a_bits = 8
    return c


def start_run(workdir_path, where='none', phase='-', step=0) -> subprocess.Popen:
    env = {**os.environ, **CACHE_ENV, 'JAX_PLATFORMS': 'cpu', 'JAX_NUM_CPU_DEVICES': str(NUM_TEST_DEVICES),
           'TF_CPP_MIN_LOG_LEVEL': '3'}
    log = open(os.path.join(os.path.dirname(workdir_path), f'{os.path.basename(workdir_path)}.log'), 'a')
    return subprocess.Popen([sys.executable, DRILL_WORKER, where, phase, str(step), *DRILL_FLAGS,
                             f'--workdir={workdir_path}'], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen) -> int:
    try:
        return process.wait(TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def log_tail(workdir_path) -> str:
    path = f'{workdir_path}.log'
    return open(path).read()[-3000:] if os.path.exists(path) else ''


def results(workdir_path) -> dict:
    """What a run leaves, without its timings: the metrics lines, the summary, the student."""
    timing = ('epoch_s', 'wall_s')
    lines = [{k: v for k, v in m.items() if k not in timing} for m in metrics.read_metrics(str(workdir_path))]
    with open(os.path.join(workdir_path, 'summary.json')) as f:
        summary = {k: v for k, v in json.load(f).items() if k not in timing}
    student = checkpoint.load_model(os.path.join(workdir_path, 'student'))[2]
    return {'lines': lines, 'summary': summary, 'student': student}


def assert_same_results(got, expected) -> None:
    """The same metrics lines, summary and student weights, exactly."""
    assert [(m['phase'], m['step']) for m in got['lines']] == [(m['phase'], m['step']) for m in expected['lines']]
    assert got['lines'] == expected['lines']
    assert got['summary'] == expected['summary']
    jax.tree.map(np.testing.assert_array_equal, got['student'], expected['student'])


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
    """The drill's run, uninterrupted, as a subprocess like the drills."""
    path = tmp_path_factory.mktemp('straight') / 'run'
    code = finish(start_run(str(path)))
    assert code == 0, log_tail(path)
    # How long the drills' runs take: with the programs that this run compiled in the cache (the
    # first run's time, compiling, can be several times as long).
    timed = tmp_path_factory.mktemp('timed') / 'run'
    start = time.monotonic()
    assert finish(start_run(str(timed))) == 0, log_tail(timed)
    return {**results(path), 'seconds': time.monotonic() - start}


# Where a run is killed, in the order a run passes them; each kill leaves what the next run
# starts from: a metrics line without its checkpoint, a training checkpoint cut off mid-write, a
# model checkpoint written but not renamed into place.
KILL_POINTS = [('after_metrics', 'teacher', 1), ('during_save', 'teacher', 2), ('before_publish', 'teacher', 0),
               ('during_save', 'bag', 1), ('after_metrics', 'bag', 2), ('before_publish', 'student', 0)]


def test_kill_9_at_each_hard_point_then_rerun_gives_the_uninterrupted_result(straight_run, tmp_path):
    path = str(tmp_path / 'run')
    for where, phase, step in KILL_POINTS:
        code = finish(start_run(path, where, phase, step))
        assert code == -signal.SIGKILL, f'not killed {where} {phase} {step} (exit {code}):\n{log_tail(path)}'
    assert os.path.exists(path + '/student' + checkpoint.PARTIAL_SUFFIX)     # the last kill left it
    assert finish(start_run(path)) == 0, log_tail(path)
    assert_same_results(results(path), straight_run)
    assert not [name for name in os.listdir(path) if name.endswith(checkpoint.PARTIAL_SUFFIX)]


def test_kill_9_at_random_moments_then_rerun_gives_the_uninterrupted_result(straight_run, tmp_path):
    path = str(tmp_path / 'run')
    rng = np.random.default_rng(9)
    killed = 0
    # Moments spread over the run (start-up, teacher, quantization, saves): each rerun resumes
    # further on, so the later kills land later in the run. Each within the first 60 % of a whole
    # run's time: runs vary by a fifth or more from the timed one (a first kill drawn at 81 % once
    # came after a run that took 82 %), and a rerun is shorter than a whole run.
    for delay in rng.uniform(0.1, 0.6, size=3) * straight_run['seconds']:
        process = start_run(path)
        time.sleep(delay)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            killed += 1
        process.wait()
    assert killed, 'every run finished before its kill: the drill tested nothing'
    assert finish(start_run(path)) == 0, log_tail(path)
    assert_same_results(results(path), straight_run)


# ------------------------------------------------------------------------------------------------
# Damaged checkpoints.


def _truncate_data_files(directory) -> None:
    """Cuts every tensorstore data file under `directory` (orbax's `d/` folders) to 10 bytes."""
    for root, _, files in os.walk(directory):
        if os.path.basename(root) == 'd':
            for name in files:
                with open(os.path.join(root, name), 'r+b') as f:
                    f.truncate(10)


def _damage(step_dir, how):
    if how == 'truncated data':
        _truncate_data_files(step_dir)
    elif how == 'garbage metadata':
        with open(os.path.join(step_dir, 'state', '_METADATA'), 'w') as f:
            f.write('{not json')
    else:   # an empty step directory, as a kill before orbax wrote anything there might leave
        shutil.rmtree(step_dir)
        os.makedirs(step_dir)


@pytest.mark.parametrize('how', ['truncated data', 'garbage metadata', 'empty step'])
def test_a_damaged_latest_step_falls_back_to_the_newest_that_restores(tmp_path, how, caplog):
    like = {'w': jnp.zeros(64), 'b': jnp.zeros(3)}
    state = lambda epoch: {'w': jnp.arange(64.0) * epoch, 'b': jnp.ones(3) * epoch}
    with checkpoint.TrainingCheckpoints(str(tmp_path)) as ckpts:
        for epoch in (1, 2):
            ckpts.save(epoch, state(epoch), {'epoch': epoch})
    _damage(str(tmp_path / '2'), how)
    with caplog.at_level(logging.WARNING), checkpoint.TrainingCheckpoints(str(tmp_path)) as ckpts:
        epoch, restored, meta = ckpts.restore(like)
        assert (epoch, meta) == (1, {'epoch': 1})
        np.testing.assert_array_equal(restored['w'], state(1)['w'])
        ckpts.save(2, state(2), {'epoch': 2})            # the damaged step is out of the way
    assert f'The checkpoint after epoch 2 in {tmp_path / "2"} cannot be restored' in caplog.text
    assert 'Resuming from the checkpoint after epoch 1 instead' in caplog.text
    assert os.path.isdir(tmp_path / ('2' + checkpoint.DAMAGED_SUFFIX))
    with checkpoint.TrainingCheckpoints(str(tmp_path)) as ckpts:
        assert ckpts.restore(like)[0] == 2


def test_no_restorable_step_says_what_to_delete(tmp_path):
    with checkpoint.TrainingCheckpoints(str(tmp_path)) as ckpts:
        ckpts.save(1, {'w': jnp.ones(8)}, {'epoch': 1})
    _damage(str(tmp_path / '1'), 'garbage metadata')
    with checkpoint.TrainingCheckpoints(str(tmp_path)) as ckpts:
        with pytest.raises(checkpoint.CheckpointError, match=rf'No checkpoint in {tmp_path} can be restored \(epoch'
                           rf'\(s\) 1; .*JSONDecodeError.*\)\. Delete {tmp_path} to train this phase again'):
            ckpts.restore({'w': jnp.zeros(8)})


@pytest.mark.parametrize('like, differs', [
    ({'w': jnp.zeros(8), 'c': jnp.zeros(2)}, r'1 array\(s\) only in the checkpoint \(b\); 1 array\(s\) only in this run \(c\)'),
    ({'w': jnp.zeros(9), 'b': jnp.zeros(3)}, r'1 array\(s\) of another shape \(w: \(8,\) saved, \(9,\) now\)'),
    ({'w': {'k': jnp.zeros(8)}, 'b': jnp.zeros(3)}, r'only in the checkpoint \(w\); 1 array\(s\) only in this run \(w/k\)'),
])
def test_a_step_of_another_state_is_not_called_damaged(tmp_path, like, differs):
    """Another config's or version's valid checkpoints: refused as not this run's, never renamed
    or offered for deletion."""
    with checkpoint.TrainingCheckpoints(str(tmp_path)) as ckpts:
        for epoch in (1, 2):
            ckpts.save(epoch, {'w': jnp.ones(8), 'b': jnp.ones(3)}, {'epoch': epoch})
    with checkpoint.TrainingCheckpoints(str(tmp_path)) as ckpts:
        with pytest.raises(checkpoint.CheckpointError, match=rf"The checkpoints in {tmp_path} do not match this run's "
                           rf'state: the one after epoch 2 has .*{differs}.*a new --workdir') as raised:
            ckpts.restore(like)
    assert 'Delete' not in str(raised.value) and 'damaged' not in str(raised.value)
    assert sorted(os.listdir(tmp_path)) == ['1', '2']
    with checkpoint.TrainingCheckpoints(str(tmp_path)) as ckpts:
        assert ckpts.restore({'w': jnp.zeros(8), 'b': jnp.zeros(3)})[0] == 2


def test_a_damaged_latest_step_in_a_run(digits_teacher, tmp_path, caplog):
    """A finished 2-epoch run whose newest step is damaged, extended to 3 epochs: it resumes after
    epoch 1 and ends as the uninterrupted 3-epoch run."""
    c = drill_config()
    c.teacher.checkpoint = digits_teacher
    c.epochs = 3
    straight = experiment.run(c, str(tmp_path / 'straight'))
    c.epochs = 2
    experiment.run(c, str(tmp_path / 'run'))
    _damage(str(tmp_path / 'run' / 'dfq_state' / '2'), 'truncated data')
    c.epochs = 3
    with caplog.at_level(logging.WARNING):
        extended = experiment.run(c, str(tmp_path / 'run'))
    assert 'dfq_state/2 cannot be restored' in caplog.text
    without_time = lambda summary: {k: v for k, v in summary.items() if k != 'wall_s'}
    assert without_time(extended) == without_time(straight)
    steps = [(m['phase'], m['step']) for m in metrics.read_metrics(str(tmp_path / 'run'))]
    assert steps == [('bag', 1), ('bag', 2), ('bag', 3)]


def test_half_written_and_damaged_model_checkpoints(digits_teacher, tmp_path):
    _, variables, meta = checkpoint.load_teacher(digits_teacher)
    target = str(tmp_path / 'teacher')
    # A save that was killed before its rename leaves DIR.partial (and no DIR); a save from before
    # this layout could leave DIR without its JSON. Neither counts, and the next save replaces it.
    os.makedirs(target + checkpoint.PARTIAL_SUFFIX + '/variables')
    os.makedirs(target + '/variables')
    assert not checkpoint.is_teacher_checkpoint(target)
    checkpoint.save_teacher(target, variables, meta)
    assert checkpoint.is_teacher_checkpoint(target) and not os.path.exists(target + checkpoint.PARTIAL_SUFFIX)
    jax.tree.map(np.testing.assert_array_equal, checkpoint.load_teacher(target)[1], variables)

    shutil.copytree(target, tmp_path / 'bad_json')
    with open(tmp_path / 'bad_json' / checkpoint.TEACHER_META, 'w') as f:
        f.write('{"depth": 8,')
    with pytest.raises(checkpoint.CheckpointError, match=r"teacher.checkpoint='.*bad_json': .*teacher.json is damaged"):
        checkpoint.load_teacher(str(tmp_path / 'bad_json'))
    shutil.copytree(target, tmp_path / 'bad_data')
    _truncate_data_files(tmp_path / 'bad_data')
    e = evaluate_config.get_config()
    e.checkpoint = str(tmp_path / 'bad_data')
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint='.*bad_data': its variables in .* cannot be "
                       r"read \(.*\); write the checkpoint again"):
        experiment.run(e, str(tmp_path / 'eval'))


# ------------------------------------------------------------------------------------------------
# One run per workdir, of one config.


def test_a_changed_config_is_refused_and_more_epochs_extend_the_run(digits_teacher, tmp_path):
    c = drill_config()
    c.teacher.checkpoint = digits_teacher
    path = str(tmp_path / 'run')
    first = experiment.run(c, path)
    with open(os.path.join(path, 'config.json')) as f:
        assert json.load(f) == settings.parse(c).record
    student = lambda: checkpoint.load_model(os.path.join(path, 'student'))

    other = drill_config()
    other.teacher.checkpoint = digits_teacher
    other.method, other.quant.w_bits, other.quant.a_bits = 'adadfq', 2, 2
    with pytest.raises(workdir.WorkdirError, match=r"holds a run made with another config \(method: 'bag' there, "
                       r"'adadfq' now; quant.a_bits: 8 there, 2 now; quant.w_bits: 8 there, 2 now\)\. .*same config "
                       r"to resume or extend it .*or give this run a new --workdir"):
        experiment.run(other, path)
    assert student()[3]['quant']['w_bits'] == 8 and json.load(open(os.path.join(path, 'summary.json'))) == first

    # Observers may change; more epochs extend the run and rewrite its student and summary.
    c.epochs, c.log_every, c.image_grid_every = 3, 2, 0
    extended = experiment.run(c, path)
    assert extended['epochs'] == 3 and extended['iterations'] == 6
    assert student()[3]['epochs'] == 3 and student()[3]['top1'] == extended['last_top1']
    steps = [(m['phase'], m['step']) for m in metrics.read_metrics(path)]
    assert steps == [('bag', 1), ('bag', 2), ('bag', 3)]
    c.epochs = 2
    with pytest.raises(ValueError, match=r'epochs=2 is fewer than the 3 epochs that the run in .* has finished: use '
                       r'epochs=3 or more'):
        experiment.run(c, path)


def test_one_run_per_workdir(digits_teacher, tmp_path):
    e = evaluate_config.get_config()
    e.checkpoint = digits_teacher
    path = str(tmp_path / 'run')
    os.makedirs(path)
    holder = subprocess.Popen([sys.executable, '-c', 'import sys, time; from bag_jax import workdir; '
                               f'workdir.Lock({path!r}); print("locked", flush=True); time.sleep(600)'],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    try:
        assert holder.stdout.readline().strip() == 'locked'
        with pytest.raises(workdir.WorkdirError, match=rf'{path} is in use by another run \(pid {holder.pid} on .*, '
                           r'started .*\)\. Wait for it to end, or give this run another --workdir'):
            experiment.run(e, path)
        assert not os.path.exists(os.path.join(path, 'summary.json'))
    finally:
        holder.kill()     # as a crash would: its lock goes with it
        holder.wait()
    assert experiment.run(e, path)['kind'] == 'teacher'
    # Released when a run ends, also when it fails.
    with workdir.Lock(path) as lock:
        assert os.path.exists(lock.path)
    missing = evaluate_config.get_config()
    missing.checkpoint = str(tmp_path / 'nothing_here')
    with pytest.raises(FileNotFoundError):
        experiment.run(missing, str(tmp_path / 'other'))
    with workdir.Lock(str(tmp_path / 'other')):
        pass

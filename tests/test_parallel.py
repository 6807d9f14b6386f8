"""Multi-process start-up, and two JAX processes on one machine against one process."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bag_jax import checkpoint, dfq, metrics, parallel, settings
from tests.multiprocess_worker import LOCAL_DEVICES, multiprocess_config, one_step_results
from tests.trajectories import (WHOLE_RUN_ACCURACY_SPREAD, WHOLE_RUN_PARAMETER_SPREAD, assert_layouts_close,
                                assert_one_step_close, assert_rounding_close, flat)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, 'tests', 'multiprocess_worker.py')
NUM_PROCESSES = 2
# The two processes take 60 to 100 s on a 2-core CPU (each compiles every program); a hang (a
# process waiting in a collective for one that died) must not hold CI up for long.
TIMEOUT_S = 420


def test_a_plain_run_stays_alone(monkeypatch):
    for name in (parallel.COORDINATOR_ENV, parallel.NUM_PROCESSES_ENV, parallel.PROCESS_ID_ENV, *parallel.TPU_HOSTS_ENVS):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: pytest.fail(f'initialized with {kw}'))
    assert parallel.distributed_settings() is None
    parallel.initialize_distributed()
    assert parallel.distributed_settings(environ={'TPU_WORKER_HOSTNAMES': 'only-host'}) is None


def test_multi_process_settings_from_flags_and_environment():
    env = {'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234', 'JAX_NUM_PROCESSES': '4', 'JAX_PROCESS_ID': '3'}
    assert parallel.distributed_settings(environ=env) == {
        'coordinator_address': '10.0.0.1:1234', 'num_processes': 4, 'process_id': 3}
    # Flags win over the environment.
    assert parallel.distributed_settings('h:1', 2, 0, environ=env) == {
        'coordinator_address': 'h:1', 'num_processes': 2, 'process_id': 0}
    # --distributed, or a multi-host TPU slice on GKE: JAX detects what is not given.
    assert parallel.distributed_settings(detect=True, environ={}) == {}
    assert parallel.distributed_settings(environ={'TPU_WORKER_HOSTNAMES': 'w0,w1'}) == {}
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='first' is not an integer"):
        parallel.distributed_settings(environ={**env, 'JAX_PROCESS_ID': 'first'})


def test_run_py_passes_its_multi_process_flags(monkeypatch):
    import run
    from absl import flags
    from bag_jax import experiment
    calls = []
    monkeypatch.setattr(experiment, 'run', lambda config, workdir, **kw: calls.append((workdir, kw)))
    try:
        flags.FLAGS(['run.py', f'--config={ROOT}/configs/digits_w3a3.py', '--workdir=w', '--coordinator_address=h:1',
                     '--num_processes=2', '--process_id=1'])
        run.main(['run.py'])
        flags.FLAGS.unparse_flags()
        flags.FLAGS(['run.py', f'--config={ROOT}/configs/digits_w3a3.py', '--workdir=w', '--distributed'])
        run.main(['run.py'])
    finally:
        flags.FLAGS.unparse_flags()
    assert calls == [('w', {'coordinator_address': 'h:1', 'num_processes': 2, 'process_id': 1, 'detect': False}),
                     ('w', {'coordinator_address': None, 'num_processes': None, 'process_id': None, 'detect': True})]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _log_tails(workdir) -> str:
    tails = []
    for i in range(NUM_PROCESSES):
        path = workdir / f'process_{i}.log'
        lines = [line for line in path.read_text().splitlines() if '[Gloo]' not in line] if path.exists() else []
        tails.append(f'--- process {i} ---\n' + '\n'.join(lines[-40:]))
    return '\n'.join(tails)


def run_processes(workdir, cache_dir, teacher_dir) -> None:
    """Runs the worker in NUM_PROCESSES processes that meet on 127.0.0.1; fails (and kills them
    all) as soon as one fails or when TIMEOUT_S have passed."""
    port = _free_port()   # free now; the coordinator (process 0) binds it a moment later
    address = f'127.0.0.1:{port}'
    procs = []
    try:
        for i in range(NUM_PROCESSES):
            env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_COORDINATOR_ADDRESS': address,
                   # JAX's coordinator listens on every interface unless told otherwise.
                   'JAX_COORDINATOR_BIND_ADDRESS': address,
                   'JAX_NUM_PROCESSES': str(NUM_PROCESSES), 'JAX_PROCESS_ID': str(i), 'PYTHONUNBUFFERED': '1'}
            with open(workdir / f'process_{i}.log', 'w') as log:
                procs.append(subprocess.Popen([sys.executable, WORKER, str(workdir), str(cache_dir), teacher_dir],
                                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed:
                pytest.fail(f'process {failed[0]} exited with {procs[failed[0]].returncode}:\n{_log_tails(workdir)}')
            if time.monotonic() > deadline:
                pytest.fail(f'the processes did not finish within {TIMEOUT_S} s:\n{_log_tails(workdir)}')
            time.sleep(0.5)
        codes = [p.returncode for p in procs]
        assert codes == [0] * NUM_PROCESSES, f'exit codes {codes}:\n{_log_tails(workdir)}'
    finally:
        for p in procs:       # JAX handles SIGTERM (preemption), so only SIGKILL stops a stuck one
            if p.poll() is None:
                p.kill()
                p.wait()


def test_two_processes_train_quantize_and_resume_as_one(digits_teacher, tmp_path):
    """2 processes x 2 CPU devices, talking over 127.0.0.1, against this process's 4 devices.

    The mesh, the global batches and so the arithmetic are the same; only the all-reduce differs
    (gloo between the processes): it adds the 4 devices' partial sums in another order, so float
    results differ in their last bits. What that cannot change is compared exactly (the data, the
    counts, the epochs); one float step from the same state (the teacher's; the DFQ step without
    quantizers) to rounding, the quantized step within what its inputs bound; whole runs, where
    training amplifies rounding, within the spread measured across CPUs and layouts.
    """
    assert jax.device_count() == NUM_PROCESSES * LOCAL_DEVICES
    workdir = tmp_path / 'two_processes'
    workdir.mkdir()
    # Their own cache (the processes' programs are not this process's), inside the session's
    # (tests/conftest.py always sets BAG_JAX_TEST_CACHE), so kept between sessions with it.
    run_processes(workdir, os.path.join(os.environ['BAG_JAX_TEST_CACHE'], 'two_processes'), digits_teacher)

    # One step from the same state, and the data order.
    two = dict(np.load(workdir / 'one_step.npz'))
    one = one_step_results(digits_teacher)
    np.testing.assert_array_equal(two.pop('data/teacher_labels'), one.pop('data/teacher_labels'))
    # The teacher's float step to rounding; the DFQ step by design (tests/trajectories.py:
    # assert_layouts_close): gloo sums the BN statistics in another order, which can step a
    # quantized activation a level, so the quantized (W8A8) calibration step where its inputs
    # bound it, the same step without quantizers to rounding; whole runs below within the spread.
    c = multiprocess_config()
    part = lambda d, prefix: {k.removeprefix(prefix): v for k, v in d.items() if k.startswith(prefix)}
    teacher_step = lambda d: {k: v for k, v in d.items() if k.startswith('teacher/')}
    assert_one_step_close(teacher_step(two), teacher_step(one), c.teacher.batch_size, 'one step: ')
    quantized = lambda d: {k: v for k, v in d.items() if k.startswith('calibrate/')}
    assert_layouts_close((quantized(two), quantized(one)), (part(two, 'float/'), part(one, 'float/')), c.batch_size,
                         c.quant.a_bits, 'one step: ')

    seen = [json.loads((workdir / f'process_{i}.json').read_text()) for i in range(NUM_PROCESSES)]
    assert [(s['process_index'], s['process_count'], s['local_devices'], s['devices']) for s in seen] == [
        (i, NUM_PROCESSES, LOCAL_DEVICES, NUM_PROCESSES * LOCAL_DEVICES) for i in range(NUM_PROCESSES)]
    written = json.loads((workdir / 'summary.json').read_text())
    without_time = lambda summary: {k: v for k, v in summary.items() if k != 'wall_s'}
    assert all(without_time(s['summary']) == without_time(written) for s in seen)   # one program, one result

    # Only process 0 wrote metrics, and the resumed run went on at epoch 2 without repeating a line.
    lines = metrics.read_metrics(str(workdir))
    assert [(m['phase'], m['step']) for m in lines] == [('teacher', 1), ('teacher', 2), ('bag', 1), ('bag', 2)]
    assert sorted(os.listdir(workdir / 'images')) == ['epoch_0001.png', 'epoch_0002.png']

    # The teacher: the session's, trained by one process with the same config (42 SGD steps).
    _, teacher_variables, teacher_meta = checkpoint.load_teacher(str(workdir / 'teacher'))
    _, reference_variables, reference_meta = checkpoint.load_teacher(digits_teacher)
    assert_rounding_close(flat(teacher_variables), flat(reference_variables), WHOLE_RUN_PARAMETER_SPREAD, 'teacher: ')
    for key in ('top1', 'top5'):
        assert abs(teacher_meta[key] - reference_meta[key]) <= WHOLE_RUN_ACCURACY_SPREAD, key

    # Quantization of that same teacher by one process, uninterrupted (4 iterations).
    c.teacher.checkpoint = str(workdir / 'teacher')
    reference = dfq.train_and_evaluate(settings.parse(c), str(tmp_path / 'one_process'))
    accuracies = ('teacher_top1', 'ptq_top1', 'best_top1', 'last_top1')
    # What rounding cannot change; the runs' and groups' accuracies are compared below.
    counted = lambda summary: {k: v for k, v in without_time(summary).items()
                               if k not in accuracies + ('best_epoch', 'runs', 'groups')}
    assert counted(written) == counted(reference)
    for key in accuracies:
        assert abs(written[key] - reference[key]) <= WHOLE_RUN_ACCURACY_SPREAD, (key, written[key], reference[key])
    assert written['devices'] == reference['devices'] == NUM_PROCESSES * LOCAL_DEVICES
    assert [(r['name'], r['seed']) for r in written['runs']] == [(r['name'], r['seed']) for r in reference['runs']]
    assert written['runs'][0]['best_top1'] == written['best_top1'] and len(written['groups']) == 1

    # The 2-run sweep on 2 x 2 devices (one run per process), interrupted and resumed: its run
    # with the config's own weight is the 2-process run above, trained on 2 devices.
    swept = json.loads((workdir / 'sweep' / 'summary.json').read_text())
    assert all(without_time(s['sweep_summary']) == without_time(swept) for s in seen)
    assert [r['name'] for r in swept['runs']] == ['loss.channel_attention=0_seed0', 'loss.channel_attention=5_seed0']
    assert c.loss.channel_attention == 5.0
    for key in ('ptq_top1', 'best_top1', 'last_top1'):
        assert abs(swept['runs'][1][key] - written[key]) <= WHOLE_RUN_ACCURACY_SPREAD, key
    assert [(m['phase'], m['step']) for m in metrics.read_metrics(str(workdir / 'sweep'))] == [('bag', 1), ('bag', 2)]
    for run in swept['runs']:
        assert checkpoint.load_model(str(workdir / 'sweep' / dfq.STUDENTS_DIR / run['name']))[0] == 'student'

"""Drill: a run whose writes fail (here a file-size limit, `ulimit -f`) ends with one line,
`run.py: error: cannot write PATH: CAUSE ...`, and no follow-on tracebacks; what it had committed
is kept, so the same command, with room to write, finishes the run."""

import json
import os
import resource
import subprocess
import sys

from tests.conftest import CACHE_ENV, NUM_TEST_DEVICES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300
# The tiny teacher's training checkpoint is about 600 KB: its first write passes the limit.
FILE_SIZE_LIMIT = 300 * 1024


def run_py(workdir, limit=None) -> subprocess.CompletedProcess:
    env = {**os.environ, **CACHE_ENV, 'JAX_PLATFORMS': 'cpu', 'JAX_NUM_CPU_DEVICES': str(NUM_TEST_DEVICES)}
    env.pop('BAG_JAX_TRACEBACK', None)
    set_limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))) if limit else None
    return subprocess.run([sys.executable, 'run.py', '--config=tests/tiny_config.py', '--config.quant.w_bits=8',
                           '--config.quant.a_bits=8', f'--workdir={workdir}'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S, preexec_fn=set_limit)


def test_a_full_disk_is_one_line_and_loses_nothing_committed(tmp_path):
    workdir = tmp_path / 'run'
    failed = run_py(workdir, FILE_SIZE_LIMIT)
    assert failed.returncode == 1, failed.stderr[-3000:]
    errors = [line for line in failed.stderr.splitlines() if line.startswith('run.py: error')]
    assert len(errors) == 1, failed.stderr[-3000:]
    assert errors[0].startswith(f'run.py: error: cannot write {workdir}/'), errors[0]
    assert os.strerror(27) in errors[0] and 'ulimit -f' in errors[0]
    assert 'Traceback' not in failed.stderr, failed.stderr[-3000:]
    assert failed.stderr.rstrip().endswith(errors[0]), 'the error is not the last line'
    # Nothing half-written counts: the rerun with room finishes the run.
    done = run_py(workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(workdir / 'summary.json') as f:
        assert json.load(f)['epochs'] == 2

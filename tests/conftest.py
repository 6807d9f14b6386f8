"""Test setup: four emulated CPU devices, so sharded code runs for real on one machine."""

import atexit
import os
import shutil
import sys
import tempfile

# XLA's LLVM back end without its expensive optimization passes: the suite compiles far more
# than it computes (one test: 91 s, 70 s so, on a 2-core Intel Xeon). Programs the tests start
# (run.py, the two processes, the notebook) inherit it. The tests' comparisons hold whatever the
# last bits of a CPU's code (tests/trajectories.py); users' runs compile with XLA's defaults.
TEST_XLA_FLAGS = '--xla_llvm_disable_expensive_passes=true'
if TEST_XLA_FLAGS not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402

NUM_TEST_DEVICES = 4
jax.config.update('jax_num_cpu_devices', NUM_TEST_DEVICES)
# Tests build the same programs many times over (every run makes fresh jit closures); a
# compilation cache shared by the session compiles each once. XLA on CPU compiles slowly.
# BAG_JAX_TEST_CACHE names a cache to keep between sessions (bench/isa_matrix.sh: one per ISA,
# since XLA's flags are part of each entry's key).
_CACHE_DIR = os.environ.get('BAG_JAX_TEST_CACHE')
if not _CACHE_DIR:
    _CACHE_DIR = tempfile.mkdtemp(prefix='bag_jax_test_xla_cache_')
    atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
    # pytest-xdist's workers (started after this runs, in the process that removes it) share it.
    os.environ['BAG_JAX_TEST_CACHE'] = _CACHE_DIR
# Subprocesses that run.py (tests/test_recovery.py) read the same cache through these.
CACHE_ENV = {'JAX_COMPILATION_CACHE_DIR': _CACHE_DIR, 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0.5'}
jax.config.update('jax_compilation_cache_dir', _CACHE_DIR)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

# configs/ imports `from configs import base`, as when run.py runs from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


def tiny_config(method: str = 'bag'):
    """A digits run small enough for CI (tests/tiny_config.py, which run.py also takes)."""
    from tests import tiny_config as config_file
    return config_file.get_config(method)


@pytest.fixture(scope='session')
def digits_teacher(tmp_path_factory):
    """A depth-8 ResNet teacher trained for 2 epochs on digits, shared by the tests that need one."""
    from bag_jax import settings, teacher
    workdir = tmp_path_factory.mktemp('digits_teacher')
    return teacher.train_teacher(settings.parse(tiny_config()), str(workdir))


def interrupted(monkeypatch, run, *, epoch: int, phase: str):
    """Calls `run()` with the metric writer raising KeyboardInterrupt when it is asked to record
    `epoch` of `phase`: after that epoch has trained, before its checkpoint is saved. Asserts that
    the interruption happened, then restores the writer."""
    from bag_jax import metrics
    original = metrics.MetricWriter.write

    def crash(self, step, *args, **kwargs):
        if step == epoch and kwargs.get('phase') == phase:
            raise KeyboardInterrupt('simulated interruption')
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(metrics.MetricWriter, 'write', crash)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(metrics.MetricWriter, 'write', original)

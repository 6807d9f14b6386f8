"""`python run.py`, killed with SIGKILL at a chosen point: the drills of tests/test_recovery.py.

    python tests/drill_worker.py WHERE PHASE STEP RUN_PY_FLAG...

WHERE is where this process kills itself, as a power cut or `kill -9` would:
  after_metrics    the metrics line of epoch STEP of PHASE ('teacher' or the method) is written,
                   the checkpoint of that epoch is not
  during_save      the training checkpoint after epoch STEP of PHASE has started writing (orbax
                   writes in a background thread: it is cut off mid-write)
  before_publish   the model checkpoint PHASE ('teacher' or 'student') is written but not yet
                   renamed into place (STEP is ignored)
  none             not at all
"""

import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bag_jax import checkpoint, metrics  # noqa: E402

STATE_DIRS = {'teacher': 'teacher_state'}    # the method's phase checkpoints into dfq_state


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(where: str, phase: str, step: int) -> None:
    """Patches the library so that this process dies at the point `where` names."""
    if where == 'after_metrics':
        write = metrics.MetricWriter.write

        def write_then_die(self, at, *args, **kwargs):
            write(self, at, *args, **kwargs)
            if at == step and kwargs.get('phase') == phase:
                _die()
        metrics.MetricWriter.write = write_then_die
    elif where == 'during_save':
        save = checkpoint.TrainingCheckpoints.save

        def save_then_die(self, epoch, *args, **kwargs):
            save(self, epoch, *args, **kwargs)
            if epoch == step and os.path.basename(self.directory) == STATE_DIRS.get(phase, 'dfq_state'):
                _die()
        checkpoint.TrainingCheckpoints.save = save_then_die
    elif where == 'before_publish':
        publish = checkpoint.publish

        def die_before_publishing(partial, directory):
            if os.path.basename(directory) == phase:
                _die()
            publish(partial, directory)
        checkpoint.publish = die_before_publishing
    elif where != 'none':
        raise SystemExit(f'unknown kill point {where!r}')


if __name__ == '__main__':
    where, phase, step, *flags = sys.argv[1:]
    arm(where, phase, int(step))
    sys.argv = [os.path.join(ROOT, 'run.py'), *flags]
    runpy.run_path(sys.argv[0], run_name='__main__')

"""Kill drills: a process killed with SIGKILL (as by `kill -9` or a power cut of the process) at a
chosen moment, then the resume that a rerun does; the files must come out whole.

Metrics (issue 20, point 4): the writer runs in a child process (`python -c`, importing only
bag_jax.metrics, so it starts in a fraction of a second) that patches itself to die at the
n-th call of one of the writer's file operations; the test then resumes as
dfq.train_and_evaluate does (MetricWriter(workdir), then writer.resume(method, start)) and
checks that TensorBoard holds every line of metrics.jsonl and every image exactly once.
"""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest

from bag_jax import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- Metrics and TensorBoard (issue 20, point 4) ---------------------------------------------

METRIC_NAMES = [f'm{i:02d}' for i in range(14)]      # 14 scalars an epoch, as a quantization run writes


def _scalars(step: int) -> dict[str, float]:
    return {name: step + i / 7 for i, name in enumerate(METRIC_NAMES)}


def _grid(step: int) -> np.ndarray:
    return np.full((12, 20, 3), 10 * step, np.uint8)


def run_epochs(workdir: str, steps, resume_after: int, images: bool) -> None:
    """The writer's calls in a quantization run resumed after epoch `resume_after`."""
    with metrics.MetricWriter(workdir, enabled=True) as writer:
        writer.resume('bag', resume_after)
        for step in steps:
            writer.write(step, _scalars(step), phase='bag')
            if images:
                writer.write_image(step, _grid(step), phase='bag')


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(ops: str, nth: int, mode: str) -> None:
    """Patches this process to SIGKILL itself at the `nth` call, counted over the operations
    named in `ops` ('|'-separated; '*': all), of the writer's file operations:
      append    MetricWriter._append_line (a metrics.jsonl line)
      record    tensorboardX's RecordWriter.write (a TensorBoard event)
      flush     RecordWriter.flush
      replace, rename, truncate, remove, rmtree   os.*, shutil.rmtree
    `mode`: 'before' the call, 'after' it, or 'torn': half of its bytes written (append,
    record)."""
    import tensorboardX.record_writer as rw
    count = [0]
    wanted = None if ops == '*' else set(ops.split('|'))

    def hook(owner, attr: str, op: str, torn=None):
        original = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            if wanted is None or op in wanted:
                count[0] += 1
                if count[0] == nth:
                    if mode == 'torn' and torn is not None:
                        torn(*args)
                        _die()
                    if mode == 'before':
                        _die()
                    result = original(*args, **kwargs)
                    _die()
                    return result
            return original(*args, **kwargs)
        setattr(owner, attr, wrapper)

    def torn_append(self, line):
        with open(self.path, 'ab') as f:
            f.write(line[:len(line) // 2])

    def torn_record(self, data):
        self._writer.write(struct.pack('<Q', len(data)) + b'\0' * 4 + data[:len(data) // 2])
        self._writer.flush()

    hook(metrics.MetricWriter, '_append_line', 'append', torn_append)
    hook(rw.RecordWriter, 'write', 'record', torn_record)
    hook(rw.RecordWriter, 'flush', 'flush')
    for name in ('replace', 'rename', 'truncate', 'remove'):
        hook(os, name, name)
    hook(shutil, 'rmtree', 'rmtree')


def _child(argv) -> None:
    """The child process: `epochs WORKDIR FIRST LAST RESUME_AFTER IMAGES OPS NTH MODE` runs
    run_epochs armed with arm(OPS, NTH, MODE); `sweep BASE ROOT` copies BASE for every kill
    point of `sweep_scenario` and runs it there in a forked process killed at that point
    (printing the directories as JSON)."""
    if argv[0] == 'epochs':
        workdir, first, last, resume_after, images, ops, nth, mode = argv[1:]
        arm(ops, int(nth), mode)
        run_epochs(workdir, range(int(first), int(last) + 1), int(resume_after), images == '1')
        return
    base, root = argv[1:]
    killed = []
    for ops, mode in (('*', 'before'), ('append|record', 'torn')):
        for nth in range(1, 1000):
            workdir = os.path.join(root, f'{mode}_{nth:03d}')
            shutil.copytree(base, workdir)
            pid = os.fork()
            if pid == 0:
                try:
                    arm(ops, nth, mode)
                    sweep_scenario(workdir)
                finally:
                    os._exit(0)      # got through: no nth operation (an error prints its traceback, exits 0 too)
            _, status = os.waitpid(pid, 0)
            if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
                shutil.rmtree(workdir)
                break
            killed.append(workdir)
    print(json.dumps(killed))


def sweep_scenario(workdir: str) -> None:
    """A rerun resumed after epoch 2 of a run that recorded epochs 1-3: metrics.jsonl and
    TensorBoard are rebuilt without epoch 3, then epochs 3 and 4 are recorded with their
    images."""
    run_epochs(workdir, (3, 4), resume_after=2, images=True)


def run_child(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    code = 'import sys; from tests import test_drills; test_drills._child(sys.argv[1:])'
    return subprocess.run([sys.executable, '-c', code, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def bag_steps(workdir) -> list[int]:
    return [m['step'] for m in metrics.read_metrics(str(workdir)) if m.get('phase') == 'bag']


@pytest.mark.parametrize('checkpointed', [3, 2])
def test_metrics_drill_killed_after_the_jsonl_line_before_tensorboard_got_it(tmp_path, checkpointed):
    """The measured moment: line 3 in metrics.jsonl, TensorBoard without it, the process gone;
    resumed after epoch 3 (its checkpoint committed) or 2 (not)."""
    from tests.tensorboard_record import assert_tensorboard_matches_record, tensorboard_events
    workdir = str(tmp_path)
    child = run_child('epochs', workdir, 1, 6, 0, 0, 'append', 3, 'after')
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert bag_steps(workdir) == [1, 2, 3]
    assert sorted({step for _, step, _ in tensorboard_events(tmp_path / 'tensorboard')}) == [1, 2]
    # The rerun, as dfq.train_and_evaluate makes it.
    run_epochs(workdir, range(checkpointed + 1, 7), resume_after=checkpointed, images=False)
    assert bag_steps(workdir) == [1, 2, 3, 4, 5, 6]
    events = tensorboard_events(tmp_path / 'tensorboard')
    assert sorted((step, tag) for tag, step, _ in events) == sorted(
        (step, f'bag/{name}') for step in range(1, 7) for name in METRIC_NAMES)
    assert_tensorboard_matches_record(tmp_path)


def test_metrics_drill_killed_in_the_middle_of_a_jsonl_line(tmp_path):
    from tests.tensorboard_record import assert_tensorboard_matches_record
    workdir = str(tmp_path)
    child = run_child('epochs', workdir, 1, 6, 0, 0, 'append', 4, 'torn')
    assert child.returncode == -signal.SIGKILL, child.stderr
    with open(tmp_path / 'metrics.jsonl', 'rb') as f:
        assert not f.read().endswith(b'\n')         # the torn line is there
    assert bag_steps(workdir) == [1, 2, 3]          # and read past
    run_epochs(workdir, range(4, 7), resume_after=3, images=False)
    with open(tmp_path / 'metrics.jsonl') as f:
        assert [json.loads(line)['step'] for line in f] == [1, 2, 3, 4, 5, 6]
    assert_tensorboard_matches_record(tmp_path)


def test_metrics_drill_killed_at_every_file_operation_of_a_resume(tmp_path):
    """Killed before each file operation of `sweep_scenario` (the rebuild's included), and in
    the middle of each metrics line and TensorBoard event it writes; every time the rerun
    leaves TensorBoard holding exactly metrics.jsonl and the images."""
    from tests.tensorboard_record import assert_tensorboard_matches_record
    base = str(tmp_path / 'base')
    with metrics.MetricWriter(base, enabled=True) as writer:
        for step in (1, 2):
            writer.write(step, {'loss': step / 10}, phase='teacher')
    run_epochs(base, (1, 2, 3), resume_after=0, images=True)
    child = run_child('sweep', base, tmp_path)
    assert child.returncode == 0, child.stderr
    killed = json.loads(child.stdout.strip().splitlines()[-1])
    assert len(killed) > 20, killed
    for workdir in killed:
        # The checkpoint after epoch 3 exists only if the run got past epoch 3's line and image.
        after = 3 if 3 in bag_steps(workdir) and os.path.exists(os.path.join(workdir, 'images', 'epoch_0003.png')) \
            else 2
        run_epochs(workdir, range(after + 1, 5), resume_after=after, images=True)
        assert bag_steps(workdir) == [1, 2, 3, 4], workdir
        assert sorted(os.listdir(os.path.join(workdir, 'images'))) == [f'epoch_{s:04d}.png' for s in (1, 2, 3, 4)]
        assert sorted(os.listdir(workdir)) == ['images', 'metrics.jsonl', 'tensorboard'], workdir
        try:
            assert_tensorboard_matches_record(workdir)
        except AssertionError as e:
            raise AssertionError(f'{os.path.basename(workdir)}: {e}') from e

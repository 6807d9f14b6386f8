"""What a run shows a person: bag_jax.console."""

import asyncio
import errno
import gc
import io
import logging as std_logging
import os
import time

import pytest
from absl import logging

from bag_jax import console


def test_progress_off_a_terminal_prints_a_line_per_interval_with_rate_eta_and_losses(monkeypatch):
    clock = iter([0.0, 5.0, 31.0, 40.0, 62.0, 70.0]).__next__
    monkeypatch.setattr(console.time, 'monotonic', clock)
    out = io.StringIO()
    progress = console.Progress(100, initial=10, desc='bag', unit='iteration', images_per_step=8, stream=out,
                                terminal=False)
    progress.set_postfix(loss_g='1.234')
    progress.update(1)           # t=5: not yet 30 s
    progress.update(20)          # t=31
    progress.update(10)          # t=40
    progress.update(10)          # t=62
    progress.close()             # t=70: the last line
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    # 21 iterations in 31 s at 8 images each; 69 left at 21/31 per s.
    assert lines[0] == 'bag: iteration 31/100 (31%), 5 images/s, ETA 0:01:41, loss_g=1.234'
    assert lines[-1].startswith('bag: iteration 51/100 (51%)')


def test_progress_on_a_terminal_is_a_bar_and_process_1_prints_nothing():
    out = io.StringIO()
    with console.Progress(4, desc='teacher', stream=out, terminal=True) as progress:
        progress.update(4)
    assert '4/4' in out.getvalue()
    quiet = io.StringIO()
    with console.Progress(4, desc='teacher', stream=quiet, terminal=False, enabled=False, every_s=0) as progress:
        progress.update(4)
    assert quiet.getvalue() == ''


def test_progress_reads_live_values_only_when_it_prints():
    class Lazy:
        reads = 0

        def __float__(self):
            Lazy.reads += 1
            return 0.5
    out = io.StringIO()
    progress = console.Progress(10, desc='teacher', stream=out, terminal=False, every_s=1e9)
    progress.live = {'step_loss': Lazy()}
    progress.update(3)
    assert Lazy.reads == 0
    progress.close()
    assert Lazy.reads == 1 and out.getvalue().rstrip().endswith('step_loss=0.5')


def record(path, level=std_logging.INFO):
    return std_logging.LogRecord('absl', level, path, 1, 'message', None, None)


def test_default_verbosity_keeps_the_projects_lines_and_others_warnings():
    handler = logging.get_absl_handler()
    try:
        console.configure_logging(0)
        project = os.path.join(os.path.dirname(console.__file__), 'dfq.py')
        orbax = '/venv/site-packages/orbax/checkpoint/checkpoint_manager.py'
        jax_file = '/venv/site-packages/jax/_src/xla_bridge.py'
        assert handler.filter(record(project))
        assert not handler.filter(record(orbax))
        assert not handler.filter(record(orbax, std_logging.ERROR))      # reported once, by the run
        assert not handler.filter(record(jax_file))
        assert handler.filter(record(jax_file, std_logging.WARNING))
        console.configure_logging(1)
        assert handler.filter(record(orbax)) and handler.filter(record(jax_file))
    finally:
        console.configure_logging(1)


def unretrieved_task_records(error):
    """The records asyncio itself logs for a task that failed with `error` and was never awaited."""
    records = []

    class Keep(std_logging.Handler):
        def emit(self, record):
            records.append(record)

    async def fail():
        raise error

    keep = Keep()
    std_logging.getLogger('asyncio').addHandler(keep)
    try:
        loop = asyncio.new_event_loop()
        task = loop.create_task(fail())
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        del task
        gc.collect()
    finally:
        std_logging.getLogger('asyncio').removeHandler(keep)
    return records


def test_default_verbosity_drops_asyncios_copies_of_a_failed_write_and_keeps_other_task_errors():
    """orbax writes each array in an asyncio task: on a full disk (seen on CI with 'ulimit -f')
    asyncio may log every task's copy of the failure before the run reports it once."""
    handler = logging.get_absl_handler()
    full = ValueError('OUT_OF_RANGE: Error writing "a/0" in OCDBT database at local file "/w/s/": Failed writing: '
                      '"/w/s/d/929b": Failed to write 54215 bytes to file 8: File too large [os_error_code=\'27\']')
    [write] = unretrieved_task_records(full)
    [bug] = unretrieved_task_records(KeyError('a bug'))
    assert write.getMessage().startswith('Task exception was never retrieved')
    try:
        console.configure_logging(0)
        assert not handler.filter(write)
        assert handler.filter(bug)
        console.configure_logging(1)
        assert handler.filter(write)
    finally:
        console.configure_logging(1)


def test_compilation_cache_directory_is_the_users_movable_and_switchable_off():
    assert console.default_cache_directory({'XDG_CACHE_HOME': '/c'}) == '/c/bag_jax/xla'
    assert console.default_cache_directory({}).endswith(os.path.join('.cache', 'bag_jax', 'xla'))
    assert console.default_cache_directory({console.COMPILATION_CACHE_ENV: '/elsewhere'}) == '/elsewhere'
    assert console.default_cache_directory({console.COMPILATION_CACHE_ENV: 'off'}) is None


@pytest.mark.parametrize('code,advice', [(errno.ENOSPC, 'free some space'), (errno.EFBIG, 'ulimit -f'),
                                         (errno.EROFS, 'writable --workdir'), (errno.EACCES, 'permissions')])
def test_a_failed_write_is_one_line_naming_the_path_and_the_cause(code, advice):
    try:
        try:
            raise OSError(code, os.strerror(code), '/w/metrics.jsonl')
        except OSError as e:
            raise RuntimeError('wrapped') from e
    except RuntimeError as wrapped:
        message = console.write_failure(wrapped)
    assert message.startswith(f'cannot write /w/metrics.jsonl: {os.strerror(code)}.') and advice in message
    assert '\n' not in message


def test_orbax_tensorstore_write_errors_are_recognized():
    error = ValueError('OUT_OF_RANGE: Error writing "a/0" in OCDBT database at local file "/w/s/": Failed writing: '
                       '"/w/s/d/929b": Failed to write 54215 bytes to file 8: File too large [os_error_code=\'27\']')
    assert console.write_failure(error).startswith(f'cannot write /w/s/d/929b: {os.strerror(errno.EFBIG)}')
    assert console.write_failure(ValueError('a bad value')) is None
    assert console.write_failure(OSError(errno.ENOENT, 'No such file', '/x')) is None


def test_follow_on_tracebacks_of_background_writers_are_dropped_and_others_kept():
    out = io.StringIO()
    stderr = console._QuietStderr(out)
    noise = ('Traceback (most recent call last):\n', '  File "asyncio/base_events.py", line 806, in call_soon\n',
             '    self._check_closed()\n', 'RuntimeError: Event loop is closed\n')
    for piece in noise:
        stderr.write(piece)
    stderr.write('\rbag: 3/4')                 # a progress bar's partial line passes at once
    assert out.getvalue() == '\rbag: 3/4'
    stderr.write('\n')
    bug = 'Traceback (most recent call last):\n  File "x.py", line 1, in f\nKeyError: 3\n'
    stderr.write(bug)
    stderr.write('run.py: error: cannot write /w/x: File too large.\n')
    assert out.getvalue() == '\rbag: 3/4\n' + bug + 'run.py: error: cannot write /w/x: File too large.\n'


def test_the_final_error_is_its_own_line_past_a_background_traceback_cut_off(monkeypatch):
    """A writer thread began a traceback (its first lines held) when the run reported the failure
    behind it: the run's line is printed alone, not as the end of that traceback (seen once in
    the ulimit drill of tests/test_write_failures.py)."""
    out = io.StringIO()
    stderr = console._QuietStderr(out)
    monkeypatch.setattr('sys.stderr', stderr)
    stderr.write('bag: step 42/42\n')
    stderr.write('Traceback (most recent call last):\n  File "asyncio/base_events.py", line 806, in call_soon_threadsafe\n')
    console.final_error('run.py: error: cannot write /w/x: File too large.')
    assert out.getvalue() == 'bag: step 42/42\nrun.py: error: cannot write /w/x: File too large.\n'
    stderr.write('next\n')                 # nothing held afterwards
    assert out.getvalue().endswith('File too large.\nnext\n')


def test_progress_off_a_terminal_speaks_while_no_step_finishes():
    out = io.StringIO()
    progress = console.Progress(10, desc='bag', unit='iteration', stream=out, terminal=False, every_s=0.2)
    deadline = time.monotonic() + 5
    while 'running for' not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.05)          # a first call compiling: no update
    progress.close()
    first = out.getvalue().splitlines()[0]
    assert first.startswith('bag: iteration 0/10 (0%)') and 'running for 0:00:00 (compiling' in first, first

"""What a run shows a person: the project's own log lines, progress, and one line per failure.

* `configure_logging(verbosity)`: at the default verbosity (0) the console shows the project's
  lines (INFO and up) and other libraries' warnings; orbax's, absl's, JAX's and TensorFlow's INFO
  lines (thousands per run: every checkpoint write logs dozens) only with `--verbosity=1`.
* `Progress`: tqdm's bar on a terminal; when stderr is a file or a pipe (nohup, a batch job, a TPU
  VM's log) a plain line at least every `PROGRESS_EVERY_S` seconds: step/total, images/s, ETA and
  the latest losses.
* `enable_compilation_cache(directory)`: JAX's persistent compilation cache, on by default under
  the user's cache directory, so a resumed or repeated run does not compile again.
* `write_failure(error)`: the one-line message for a failed write (no space, file too large, no
  permission, a read-only file system), wherever in the chain of exceptions it is.
"""

from __future__ import annotations

import errno
import logging as std_logging
import os
import re
import sys
import threading
import time
from typing import Any

from absl import logging

PROGRESS_EVERY_S = 30.0
# Where the compiled programs are kept between runs: BAG_JAX_COMPILATION_CACHE (a directory, or
# 'off'), else $XDG_CACHE_HOME/bag_jax/xla (~/.cache/bag_jax/xla).
COMPILATION_CACHE_ENV = 'BAG_JAX_COMPILATION_CACHE'
# Programs that compile faster than this are not worth a file (JAX's default is 1 s).
CACHE_MIN_COMPILE_S = 0.5

_PROJECT_FILES = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d) + os.sep
                       for d in ('bag_jax', 'configs'))
# orbax reports a failed background write as ERROR lines from several threads before the error
# reaches the run, which reports it once.
_ORBAX = os.sep + 'orbax' + os.sep
_WRITE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)
# tensorstore (orbax's array writer) reports an OS error inside its message.
_TENSORSTORE_WRITE = re.compile(
    r'Failed (?:writing|to write)[^"]*"(?P<path>[^"]+)".*?\[os_error_code=\'(?P<code>\d+)\'\]', re.S)


def _is_project_record(record: std_logging.LogRecord) -> bool:
    path = record.pathname or ''
    return path.startswith(_PROJECT_FILES) or os.path.basename(path) == 'run.py'


def _is_unretrieved_write_failure(record: std_logging.LogRecord) -> bool:
    """asyncio's 'Task exception was never retrieved' (an ERROR with a traceback) for an orbax
    write task that failed to write a file: the run reports that failure in one line, and whether
    asyncio logs each task's copy of it first depends on when the tasks are collected."""
    return (record.name == 'asyncio' and record.exc_info is not None and record.exc_info[1] is not None
            and write_failure(record.exc_info[1]) is not None)


class _QuietThirdParty(std_logging.Filter):
    """Lets the project's records through, and other libraries' warnings and errors (orbax's
    only when critical: see _ORBAX; asyncio's unretrieved write failures not at all)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if _is_project_record(record):
            return True
        if _is_unretrieved_write_failure(record):
            logging.debug('a background write failed: %s', record.exc_info[1])
            return False
        if _ORBAX in (record.pathname or ''):
            return record.levelno >= std_logging.CRITICAL
        return record.levelno >= std_logging.WARNING


def configure_logging(verbosity: int) -> None:
    """Console logging for `verbosity` (absl's flag: 0 by default, 1 shows everything, -1 only
    warnings). At 0, other libraries' INFO lines are dropped and lines read `HH:MM:SS message`."""
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2' if verbosity < 1 else '0')
    handler = logging.get_absl_handler()
    for f in [f for f in handler.filters if isinstance(f, _QuietThirdParty)]:
        handler.removeFilter(f)
    if verbosity < 1:
        handler.addFilter(_QuietThirdParty())
        quiet_background_tracebacks()
        handler.setFormatter(std_logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))
    else:
        handler.setFormatter(logging.PythonFormatter())


def default_cache_directory(environ=os.environ) -> str | None:
    """The compilation cache's directory: $BAG_JAX_COMPILATION_CACHE ('off': none), else
    $XDG_CACHE_HOME/bag_jax/xla, else ~/.cache/bag_jax/xla."""
    setting = environ.get(COMPILATION_CACHE_ENV, '').strip()
    if setting.lower() in ('off', 'none', '0', 'false'):
        return None
    if setting:
        return os.path.expanduser(setting)
    base = environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'bag_jax', 'xla')


def enable_compilation_cache(directory: str | None) -> str | None:
    """Turns on JAX's persistent compilation cache in `directory` (None: off) unless the user set
    JAX's own JAX_COMPILATION_CACHE_DIR, which wins. Returns the directory in use, or None."""
    import jax
    if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
        return os.environ['JAX_COMPILATION_CACHE_DIR']
    if directory is None:
        return None
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        logging.warning('the compilation cache %s cannot be created (%s): compiling without it.', directory,
                        os.strerror(e.errno) if e.errno else e)
        return None
    jax.config.update('jax_compilation_cache_dir', directory)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', CACHE_MIN_COMPILE_S)
    return directory


# The last lines of the tracebacks that orbax's and tensorstore's background callbacks print
# (straight to stderr, past sys.excepthook) after a failed write closed orbax's event loop, and
# while Python shuts down under them: each a consequence of a failure that the run reports itself.
BACKGROUND_NOISE = ('RuntimeError: Event loop is closed',
                    'ImportError: sys.meta_path is None, Python is likely shutting down')


class _QuietStderr:
    """sys.stderr, less the tracebacks that end in a BACKGROUND_NOISE line. Everything else
    passes through as it is written (a progress bar's partial lines at once); a traceback is
    held until its last line says what it is."""

    def __init__(self, stream):
        self._stream = stream
        self._pending = ''          # an incomplete line of a held traceback
        self._held: list[str] = []  # the lines of a traceback being held

    def write(self, text: str) -> int:
        if not self._held and not self._pending and not text.startswith('Traceback'):
            return self._stream.write(text)
        self._pending += text
        *lines, self._pending = self._pending.split('\n')
        for line in lines:
            self._line(line)
        if not self._held and self._pending and not 'Traceback'.startswith(self._pending[:9]):
            self._stream.write(self._pending)
            self._pending = ''
        return len(text)

    def _line(self, line: str) -> None:
        if not self._held and not line.startswith('Traceback (most recent call last)'):
            self._stream.write(line + '\n')
            return
        self._held.append(line)
        if line and not line[0].isspace() and not line.startswith('Traceback'):   # the exception's line
            held, self._held = self._held, []
            if line.strip() in BACKGROUND_NOISE:
                logging.debug('a background thread failed: %s', line)
            else:
                self._stream.write('\n'.join(held) + '\n')

    def flush(self) -> None:
        self._stream.flush()

    def drop_held(self):
        """Drops a traceback still being held (a background thread's, cut off by the run's own
        failure) and returns the stream underneath."""
        if self._held or self._pending:
            logging.debug('a background traceback was cut off: %s', (self._held or [self._pending])[0])
        self._held, self._pending = [], ''
        return self._stream

    def __getattr__(self, name):      # isatty, fileno, encoding, ...
        return getattr(self._stream, name)


def quiet_background_tracebacks() -> None:
    """Drops the follow-on tracebacks of BACKGROUND_NOISE from sys.stderr (the default verbosity;
    the run reports the failure behind them in one line)."""
    if not isinstance(sys.stderr, _QuietStderr):
        sys.stderr = _QuietStderr(sys.stderr)


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def write_failure(error: BaseException, where: str = 'a file of the run') -> str | None:
    """'cannot write PATH: CAUSE ...' when `error` (or an exception it came from) is a failed write
    of a file: no space, file too large, no permission, read-only; None otherwise. `where` names
    the file when the error does not (a write to a file already open)."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            path = e.filename or where
            return _write_message(path, e.errno)
        match = _TENSORSTORE_WRITE.search(str(e))
        if match and int(match['code']) in _WRITE_ERRNOS:
            return _write_message(match['path'], int(match['code']))
    return None


def _write_message(path: str, code: int) -> str:
    advice = {errno.ENOSPC: 'free some space', errno.EDQUOT: 'free some space (disk quota)',
              errno.EFBIG: "raise the file-size limit ('ulimit -f')",
              errno.EROFS: 'give the run a writable --workdir'}.get(code, 'fix its permissions')
    return (f'cannot write {path}: {os.strerror(code)}. What the run had committed is kept: {advice}, then run '
            'the same command again to resume.')


def final_error(message: str) -> None:
    """Writes the run's last line to stderr on its own line: past a background thread's traceback
    that the quiet stderr is holding (one that began before this failure was reported would
    otherwise be printed with this line as its end), which is dropped."""
    stream = sys.stderr.drop_held() if isinstance(sys.stderr, _QuietStderr) else sys.stderr
    stream.write(message + '\n')


def exit_now(code: int) -> None:
    """Ends the process at once, after flushing the console: background writer threads (orbax's)
    would otherwise each print a traceback of the same failure while Python shuts down."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class Progress:
    """Progress of `total` steps of `unit`, from `initial`, shown by process 0 only.

    On a terminal, tqdm's bar. Elsewhere one line per `every_s` seconds (and one at the end):
        teacher: step 120/1000 (12%), 853 images/s, ETA 0:01:43, loss=0.412
    also between steps (a background thread prints it), and while no step finishes for that long
    (a program compiling, an evaluation) with how long the current step has taken so far.
    `images_per_step` turns the rate into images per second. `postfix` (set_postfix) holds the
    latest epoch's values; `live` may hold the latest step's arrays, read (and so waited for) only
    when a line is printed.
    """

    def __init__(self, total: int, *, initial: int = 0, desc: str, unit: str = 'step', images_per_step: int = 0,
                 enabled: bool = True, every_s: float = PROGRESS_EVERY_S, stream=None, terminal: bool | None = None):
        self.total, self.done, self.desc, self.unit = total, initial, desc, unit
        self.images_per_step, self.every_s, self.enabled = images_per_step, every_s, enabled
        self.stream = stream or sys.stderr
        self.postfix: dict[str, Any] = {}
        self.live: dict[str, Any] = {}
        self._start_done, self._start = initial, time.monotonic()
        self._last_line = self._start
        terminal = self.stream.isatty() if terminal is None else terminal
        self._bar = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._last_step = self._start
        if enabled and terminal:
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream)
        elif enabled:
            threading.Thread(target=self._heartbeat, name='progress', daemon=True).start()

    def _heartbeat(self) -> None:
        while not self._stopped.wait(self.every_s / 4):
            now = time.monotonic()
            with self._lock:
                if self.enabled and now - self._last_line >= self.every_s:
                    stalled = now - self._last_step >= self.every_s
                    try:
                        self._line(now, from_thread=True, waiting=now - self._last_step if stalled else None)
                    except (OSError, ValueError):     # the stream is gone (closed by its owner)
                        return

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled:
            now = time.monotonic()
            with self._lock:
                self._last_step = now
                if now - self._last_line >= self.every_s:
                    self._line(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def _line(self, now: float, from_thread: bool = False, waiting: float | None = None) -> None:
        self._last_line = now
        elapsed, steps = now - self._start, self.done - self._start_done
        parts = [f'{self.desc}: {self.unit} {self.done}/{self.total} ({100.0 * self.done / max(self.total, 1):.0f}%)']
        if steps > 0 and elapsed > 0:
            rate = steps / elapsed
            if self.images_per_step:
                parts.append(f'{rate * self.images_per_step:.0f} images/s')
            else:
                parts.append(f'{rate:.3g} {self.unit}/s')
            parts.append(f'ETA {_clock((self.total - self.done) / rate)}')
        parts += [f'{k}={v}' for k, v in self.postfix.items()]
        if not from_thread:       # the heartbeat does not wait for the device's arrays
            parts += [f'{k}={float(v):.4g}' for k, v in self.live.items() if k not in self.postfix]
        if waiting is not None:
            parts.append(f'this {self.unit} running for {_clock(waiting)} (compiling, evaluating or saving)')
        print(', '.join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        self._stopped.set()
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            elif self.enabled and self.done > self._start_done:
                self._line(time.monotonic())
            self.enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

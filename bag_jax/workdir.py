"""One run per workdir, and a workdir that knows which run it holds.

    WORKDIR/config.json   the resolved config of the run in it (written by process 0)
    WORKDIR/run.lock      locked by process 0 while a run lives; names its pid, host and start

`claim(config, workdir)` is the first thing a run does, before anything is loaded or compiled:
  * it takes the lock, or refuses a second run while another one is alive. The lock is an
    advisory `flock`, which the kernel drops when its process ends however it ends, so a killed
    run leaves nothing to clean up;
  * it compares the config with the one recorded in `config.json`. Fields that only extend or
    observe a run (`EXTENDABLE_FIELDS`) may change: the run continues and rewrites its outputs.
    Any other difference is refused with the list of changed fields, since the state in the
    workdir was made by the recorded config;
  * it records the config.

In a multi-process run process 0 decides and tells the others, so that all stop together.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from typing import Any, Iterator

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from bag_jax import settings

CONFIG_FILE = 'config.json'
LOCK_FILE = 'run.lock'
# Fields that extend a run (more epochs) or only change what it logs or how it evaluates.
EXTENDABLE_FIELDS = ('epochs', 'log_every', 'image_grid_every', 'eval_batch_size')


class WorkdirError(RuntimeError):
    """The workdir is in use by another run, or holds a run made with another config."""


def changed_fields(recorded: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted field: (recorded value, current value)} for every field that differs; a field
    present on one side only shows as missing on the other."""
    old, new = settings.flat_fields(recorded), settings.flat_fields(current)
    missing = '<absent>'
    return {k: (old.get(k, missing), new.get(k, missing)) for k in sorted(old.keys() | new.keys())
            if old.get(k, missing) != new.get(k, missing)}


def check_config(workdir: str, record: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Compares `record` with `workdir/config.json`. Returns the changed extendable fields;
    raises WorkdirError listing the others when any other field differs."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            recorded = json.load(f)
        if not isinstance(recorded, dict):
            raise ValueError('not a JSON object')
    except ValueError as e:
        raise WorkdirError(f'{path} is damaged ({e}): restore it, or delete it if you are sure that this '
                           'config is the one that made the run in the workdir.') from None
    changes = changed_fields(recorded, record)
    refused = {k: v for k, v in changes.items() if k not in EXTENDABLE_FIELDS}
    if refused:
        listing = '; '.join(f'{k}: {old!r} there, {new!r} now' for k, (old, new) in refused.items())
        raise WorkdirError(
            f'{workdir} holds a run made with another config ({listing}). Its checkpoints belong to that config: '
            f'run it again with the same config to resume or extend it (only {", ".join(EXTENDABLE_FIELDS)} may '
            f'change), or give this run a new --workdir.')
    return changes


def write_config(workdir: str, record: dict[str, Any]) -> None:
    """Writes `workdir/config.json` atomically (a reader sees the old file or the new one)."""
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path + '.tmp', 'w') as f:
        json.dump(record, f, indent=2, sort_keys=True)
    os.replace(path + '.tmp', path)


class Lock:
    """An exclusive `flock` on `workdir/run.lock`, held until `release()`.

    Raises WorkdirError, naming the holder, when another live process holds it. A process that
    dies releases it with its file descriptors, so a stale lock cannot exist.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(self._fd, 4096, 0).decode(errors='replace').strip()
            os.close(self._fd)
            self._fd = None
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirError(
                    f'{workdir} is in use by another run ({_describe_holder(holder)}). Wait for it to end, or give '
                    'this run another --workdir.') from None
            # A file system without locks: run, but say that a second run would not be noticed.
            logging.warning('%s cannot be locked (%s): a second run in this workdir would not be detected.',
                            self.path, os.strerror(e.errno))
            return
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                                        'started': datetime.datetime.now().isoformat(timespec='seconds')}).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f'pid {holder["pid"]} on {holder["host"]}, started {holder["started"]}'
    except (ValueError, KeyError, TypeError):
        return 'a process that has not written its name yet'


@contextlib.contextmanager
def claim(record: dict[str, Any], workdir: str) -> Iterator[None]:
    """Holds `workdir` for one run of the config `record` (settings.Experiment.record: the config
    as the JSON object that `config.json` holds; see the module docstring); every process enters
    it together. Raises WorkdirError before anything is loaded when the workdir is in use or
    holds a run of another config."""
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            os.makedirs(workdir, exist_ok=True)
            lock = Lock(workdir)
            changes = check_config(workdir, record)
            if changes:
                logging.info('continuing the run in %s with %s', workdir,
                             ', '.join(f'{k}={new!r} (was {old!r})' for k, (old, new) in changes.items()))
            write_config(workdir, record)
        except (WorkdirError, OSError) as e:
            error = e if isinstance(e, WorkdirError) else WorkdirError(f'the workdir {workdir} cannot be used: {e}')
            if lock is not None:
                lock.release()
    if jax.process_count() > 1:
        refused = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if refused and error is None:
            error = WorkdirError(f'process 0 refused the workdir {workdir}; its log says why.')
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.release()

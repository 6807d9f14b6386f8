"""The papers' teachers from the pytorchcv model zoo: fetched once, checked, converted once.

    --config.teacher.checkpoint=pytorchcv:resnet20_cifar100     (or resnet18, resnet50, mobilenetv2_w1)
    python -m bag_jax.zoo resnet18        # fetch + convert now (on a machine with internet), print the dir

`teacher_checkpoint('pytorchcv:NAME')` returns a teacher checkpoint directory. The first call

  1. finds the zoo file in the cache, `CACHE/pytorchcv/STEM.pth` or `STEM.pth.zip` (put there by
     hand, or downloaded earlier), or else downloads `STEM.pth.zip` from the zoo's release
     (`ZOO_URL/TAG/STEM.pth.zip`, the base overridable with $BAG_JAX_ZOO_URL for a mirror), once,
     with a short timeout and no retries: an offline machine fails at once with a message saying
     where to put the file by hand;
  2. checks the SHA-1 of the `.pth` (for a `.pth.zip`, of the `STEM.pth` inside it) against the
     zoo's; a file that differs is renamed to `*.bad` and the run stops, naming both hashes;
  3. converts it (`bag_jax.convert`) into `CACHE/pytorchcv/STEM.converting/` and renames that to
     `CACHE/pytorchcv/STEM/` when complete, so an interrupted conversion is simply redone.

Later calls find `CACHE/pytorchcv/STEM/` and return it at once: no network, no hashing.
CACHE is $BAG_JAX_CACHE, else ~/.cache/bag_jax. In a multi-process run only process 0 downloads
and checks; the conversion is collective (it writes through `checkpoint.save_teacher`, which all
processes call together), so CACHE must be on a file system every process sees, as a workdir is.

pytorchcv's own rule, followed here (pytorchcv 0.0.74 `models/common/model_store.py`
`get_model_file`; the same code in the copy AdaDFQ vendors, `AdaDFQ/ImageNet/pytorchcv/models/
model_store.py`): the file is `{name}-{error}-{sha1[:8]}.pth`, downloaded as
`https://github.com/osmr/imgclsmob/releases/download/{tag}/{file}.zip` and extracted; the SHA-1
of the extracted `.pth` must equal the full 40-digit hash of its table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import http.client
import os
import shutil
import sys
import urllib.error
import urllib.request
import zipfile

import jax
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from bag_jax import checkpoint, convert

PREFIX = 'pytorchcv:'
ZOO_URL = 'https://github.com/osmr/imgclsmob/releases/download'   # pytorchcv's imgclsmob_repo_url + /releases/download
URL_ENV = 'BAG_JAX_ZOO_URL'        # another base URL (a mirror): BASE/TAG/STEM.pth.zip
CACHE_ENV = 'BAG_JAX_CACHE'        # the cache root; the zoo's files go to CACHE/pytorchcv/
DEFAULT_CACHE = os.path.join('~', '.cache', 'bag_jax')
TIMEOUT_S = 20.0                   # per connect and per read stall; an offline machine fails at once
CONVERTING_SUFFIX = '.converting'  # a conversion in progress (removed and redone when found)
BAD_SUFFIX = '.bad'                # a zoo file whose SHA-1 was wrong, set aside


class ZooUnavailableError(FileNotFoundError):
    """The zoo file is not in the cache and cannot be downloaded (offline, blocked, not found)."""


class ZooChecksumError(ValueError):
    """A zoo file's SHA-1 is not the zoo's: a truncated download, a proxy's page, another file."""


@dataclasses.dataclass(frozen=True)
class ZooFile:
    """One file of the osmr/imgclsmob zoo: model name, the error number of its file name (top-1
    error for CIFAR, top-5 for ImageNet, in hundredths of a percent), its SHA-1, its release tag."""
    name: str
    error: str
    sha1: str
    tag: str

    @property
    def stem(self) -> str:
        """'resnet20_cifar100-2964-a5322afe': the file name without '.pth', as pytorchcv builds it."""
        return f'{self.name}-{self.error}-{self.sha1[:8]}'

    def url(self, base: str | None = None) -> str:
        """Where the zoo publishes `STEM.pth.zip` (`base` defaults to $BAG_JAX_ZOO_URL, else ZOO_URL)."""
        base = base or os.environ.get(URL_ENV) or ZOO_URL
        return f'{base.rstrip("/")}/{self.tag}/{self.stem}.pth.zip'


# The files the papers used, with pytorchcv's (name, error, sha1, tag). Source: the model store
# AdaDFQ vendors (hfutqian/AdaDFQ @9948083 `AdaDFQ/ImageNet/pytorchcv/models/model_store.py`
# `_model_sha1`), which the ImageNet code loads (docs/imagenet.md 1); the CIFAR entries and
# resnet50, mobilenetv2_w1 are identical in PyPI pytorchcv 0.0.74 (`model_metainfos.csv`), whose
# resnet18 is a newer file (resnet18-0896-77a56f15, v0.0.478) that the papers did not use.
ZOO_FILES: dict[str, ZooFile] = {f.name: f for f in (
    ZooFile('resnet20_cifar100', '2964', 'a5322afed92fa96cb7b3453106f73cf38e316151', 'v0.0.180'),  # docs/algorithms.md 1.1
    ZooFile('resnet20_cifar10', '0597', '9b0024ac4c2f374cde2c5052e0d0344a75871cdb', 'v0.0.163'),
    ZooFile('resnet18', '0982', '0126861b4cd7f7b14196b1e01827da688f8bab6d', 'v0.0.153'),           # docs/imagenet.md 1
    ZooFile('resnet50', '0633', 'b00d1c8e52aa7a2badc705b1545aaf6ccece6ce9', 'v0.0.329'),
    ZooFile('mobilenetv2_w1', '0887', '13a021bca5b679b76156829743f7182da42e8bb6', 'v0.0.213'),
)}


def is_zoo_spec(value) -> bool:
    """True for a `teacher.checkpoint` value of the form 'pytorchcv:NAME'."""
    return isinstance(value, str) and value.startswith(PREFIX)


def zoo_file(spec: str, field: str = 'teacher.checkpoint') -> ZooFile:
    """The ZooFile that 'pytorchcv:NAME' (or NAME) names; ValueError listing the known names."""
    name = spec[len(PREFIX):] if is_zoo_spec(spec) else spec
    if name not in ZOO_FILES:
        known = ', '.join(f'{PREFIX}{n}' for n in ZOO_FILES)
        raise ValueError(f'{field}={spec!r} names no pytorchcv zoo file bag_jax knows: use one of {known}, '
                         'or a teacher checkpoint directory (python -m bag_jax.convert --pytorchcv FILE --out DIR).')
    return ZOO_FILES[name]


def cache_dir_for(cache_dir: str | None = None) -> str:
    """The absolute directory holding the zoo's files and their conversions: CACHE/pytorchcv, with
    CACHE = `cache_dir`, else $BAG_JAX_CACHE, else ~/.cache/bag_jax."""
    root = cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return os.path.join(os.path.abspath(os.path.expanduser(root)), 'pytorchcv')


def file_sha1(path: str, member: str | None = None) -> str:
    """Hex SHA-1 of the file `path`, or of the archive member `member` of the zip file `path`."""
    sha1 = hashlib.sha1()
    with open(path, 'rb') as raw:
        with (zipfile.ZipFile(raw) if member else contextlib.nullcontext()) as archive:
            with (archive.open(member) if member else contextlib.nullcontext(raw)) as f:
                while chunk := f.read(1 << 20):
                    sha1.update(chunk)
    return sha1.hexdigest()


def sha1_problem(path: str, entry: ZooFile, zipped: bool) -> str | None:
    """None if `path` passes pytorchcv's check (the SHA-1 of `STEM.pth`, the file itself or, when
    `zipped`, the archive's member of that name, equals `entry.sha1`); else what is wrong, in words."""
    inner = f'{entry.stem}.pth'
    if zipped:
        try:
            with zipfile.ZipFile(path) as archive:
                members = archive.namelist()
        except zipfile.BadZipFile:
            return 'it is not a zip archive'
        if inner not in members:
            return f'the archive holds {members[:5]}, not {inner}'
        got = file_sha1(path, inner)
    else:
        got = file_sha1(path)
    return None if got == entry.sha1 else f'the SHA-1 of {inner} is {got}, expected {entry.sha1}'


def verify(path: str, entry: ZooFile, target: str | None = None) -> None:
    """Raises ZooChecksumError unless `path` passes `sha1_problem`, after renaming it to
    `TARGET.bad` (`target` defaults to `path`: the name the file has, or would have, in the cache),
    so that no later call finds and trusts it. A target named `.zip` is read as an archive."""
    target = target or path
    problem = sha1_problem(path, entry, zipped=target.endswith('.zip'))
    if problem is None:
        return
    os.replace(path, target + BAD_SUFFIX)
    raise ZooChecksumError(
        f'{target} is not the zoo file {entry.stem} (pytorchcv {entry.name}, {entry.tag}): {problem}. '
        f'It was moved to {target + BAD_SUFFIX}. Run again to download it anew from {entry.url()}, '
        f'or put the right file at {target}.')


def _local_file(directory: str, entry: ZooFile) -> str | None:
    for path in (os.path.join(directory, f'{entry.stem}.pth'), os.path.join(directory, f'{entry.stem}.pth.zip')):
        if os.path.isfile(path):
            return path
    return None


def _where_to_put(directory: str, entry: ZooFile) -> str:
    return (f'On a machine with internet, download {entry.url(ZOO_URL)} and copy it to '
            f'{os.path.join(directory, entry.stem + ".pth.zip")} (or the {entry.stem}.pth inside it, which '
            f'pytorchcv keeps in ~/.torch/models, to {os.path.join(directory, entry.stem + ".pth")}); the next '
            f'run checks and converts it. A mirror of the zoo\'s releases can be named with ${URL_ENV}.')


def download(entry: ZooFile, directory: str, timeout: float = TIMEOUT_S) -> str:
    """Downloads `STEM.pth.zip` into `directory` (through a temporary name, so no half-written file
    ever carries the real one), checks it (`verify`) and returns its path. One try: failing to
    connect or to read raises ZooUnavailableError saying where to put the file by hand."""
    url = entry.url()
    target = os.path.join(directory, f'{entry.stem}.pth.zip')
    partial = f'{target}.download-{os.getpid()}'
    os.makedirs(directory, exist_ok=True)
    logging.info('downloading %s to %s', url, target)
    try:
        request = urllib.request.Request(url, headers={'User-Agent': 'bag_jax'})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(partial, 'wb') as f:
            size = int(response.headers.get('Content-Length') or 0) or None
            with tqdm(total=size, unit='B', unit_scale=True, desc=entry.stem, disable=None) as progress:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    progress.update(len(chunk))
            if size is not None and f.tell() != size:
                raise http.client.IncompleteRead(b'', size - f.tell())
    except (OSError, http.client.HTTPException) as e:   # URLError, HTTPError, timeouts, resets
        if os.path.exists(partial):
            os.remove(partial)
        reason = getattr(e, 'reason', None) or e
        raise ZooUnavailableError(f'{entry.stem}.pth.zip is not in {directory} and downloading it from {url} '
                                  f'failed ({type(e).__name__}: {reason}). {_where_to_put(directory, entry)}') from None
    verify(partial, entry, target)
    os.replace(partial, target)
    return target


def fetch(spec: str, cache_dir: str | None = None, timeout: float = TIMEOUT_S) -> str:
    """The checked zoo file for 'pytorchcv:NAME': found in the cache or downloaded there.

    Returns the path of `STEM.pth` or `STEM.pth.zip` under `cache_dir_for(cache_dir)`. Raises
    ZooChecksumError for a file whose SHA-1 is wrong (set aside as `*.bad`), ZooUnavailableError
    when it is missing and cannot be downloaded. Hashes the file (a second or so for ResNet-50).
    """
    entry = zoo_file(spec)
    directory = cache_dir_for(cache_dir)
    path = _local_file(directory, entry)
    if path is None:
        return download(entry, directory, timeout)
    logging.info('checking %s', path)
    verify(path, entry)
    return path


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def teacher_checkpoint(spec: str, cache_dir: str | None = None, timeout: float = TIMEOUT_S) -> str:
    """The teacher checkpoint directory of the zoo file 'pytorchcv:NAME', made on first use.

    `CACHE/pytorchcv/STEM/` (see the module docstring): returned at once when it is there;
    otherwise the file is fetched and checked (`fetch`, process 0 only) and converted
    (`bag_jax.convert.convert`, all processes together). Raises ValueError for an unknown NAME,
    ZooUnavailableError / ZooChecksumError as `fetch`, and what `convert` raises for a file it
    cannot convert.
    """
    entry = zoo_file(spec)
    directory = os.path.join(cache_dir_for(cache_dir), entry.stem)
    if checkpoint.is_teacher_checkpoint(directory):
        return directory
    failure = path = None
    if jax.process_index() == 0:
        try:
            path = fetch(spec, cache_dir, timeout)
        except Exception as e:   # every process must reach the barrier before anyone raises
            failure = e
    _sync(f'bag_jax.zoo fetched {entry.stem}')
    if failure is not None:
        raise failure
    path = path or _local_file(os.path.dirname(directory), entry)
    if path is None:
        raise ZooUnavailableError(f'process 0 could not fetch {entry.stem} (its log says why); '
                                  f'{_where_to_put(os.path.dirname(directory), entry)}')

    converting = directory + CONVERTING_SUFFIX
    if jax.process_index() == 0 and os.path.exists(converting):
        shutil.rmtree(converting)   # left by an interrupted conversion
    _sync(f'bag_jax.zoo converting {entry.stem}')
    logging.info('converting %s into %s', path, directory)
    convert.convert(path, converting)
    if jax.process_index() == 0:
        checkpoint.publish(converting, directory)
    _sync(f'bag_jax.zoo converted {entry.stem}')
    return directory


def checkpoint_directory(value: str) -> str:
    """The directory a checkpoint field (teacher.checkpoint, the evaluate mode's checkpoint) names:
    the value itself, or for 'pytorchcv:NAME' the zoo teacher, fetched and converted on first use."""
    return teacher_checkpoint(value) if is_zoo_spec(value) else value


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (errors are one line on stderr)."""
    parser = argparse.ArgumentParser(
        prog='python -m bag_jax.zoo',
        description='Fetch a pytorchcv zoo file the papers used, check its SHA-1, convert it into a teacher '
                    'checkpoint once, and print that directory (for --config.teacher.checkpoint).')
    parser.add_argument('name', metavar='NAME', help=f'one of {", ".join(ZOO_FILES)} (or pytorchcv:NAME)')
    parser.add_argument('--cache_dir', default=None,
                        help=f'cache root (default ${CACHE_ENV}, else {DEFAULT_CACHE}); files go to CACHE/pytorchcv/')
    args = parser.parse_args(argv)
    spec = args.name if is_zoo_spec(args.name) else PREFIX + args.name
    try:
        zoo_file(spec, field='NAME')
        directory = teacher_checkpoint(spec, args.cache_dir)
    except (OSError, ValueError) as e:
        print(f'{parser.prog}: error: {e}', file=sys.stderr)
        return 1
    print(directory)
    return 0


if __name__ == '__main__':
    sys.exit(main())

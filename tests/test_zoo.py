"""bag_jax.zoo against a local HTTP server serving a zoo-style file made from the resnet8
fixture: download, SHA-1 check, one conversion, reuse, offline use and failures. Never the network:
every test points $BAG_JAX_ZOO_URL at 127.0.0.1 and $BAG_JAX_CACHE at a temporary directory."""

import functools
import hashlib
import http.server
import os
import shutil
import socket
import threading
import time
import zipfile

import jax
import numpy as np
import pytest

from bag_jax import checkpoint, convert, settings, teacher, zoo
from configs import cifar100_w3a3
from tests.conftest import tiny_config

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'resnet8_cifar10.pth.zip')
TAG = 'v0.0.1'


def _fixture_pth() -> bytes:
    with zipfile.ZipFile(FIXTURE) as archive:
        return archive.read('resnet8_cifar10.pth')


PTH = _fixture_pth()
# A zoo entry for the fixture, its name carrying the real hash as pytorchcv's file names do.
ENTRY = zoo.ZooFile('resnet8_cifar10', '0000', hashlib.sha1(PTH).hexdigest(), TAG)
SPEC = 'pytorchcv:resnet8_cifar10'


def write_zoo_zip(path, pth_bytes=PTH, inner=f'{ENTRY.stem}.pth'):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(inner, pth_bytes)


def closed_port() -> int:
    """A local port nothing listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Server:
    """Serves `root` over HTTP on 127.0.0.1 in a thread, counting the GET requests."""

    def __init__(self, root):
        self.root, self.hits = str(root), 0
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                server.hits += 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Handler, directory=self.root))
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache, the fixture's entry in the zoo table, and no reachable zoo by default."""
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / 'cache'))
    monkeypatch.setenv(zoo.URL_ENV, f'http://127.0.0.1:{closed_port()}')
    monkeypatch.setitem(zoo.ZOO_FILES, ENTRY.name, ENTRY)
    return tmp_path / 'cache' / 'pytorchcv'


@pytest.fixture
def server(tmp_path, monkeypatch, cache):
    """The zoo's release of the fixture: BASE/v0.0.1/STEM.pth.zip."""
    root = tmp_path / 'served'
    write_zoo_zip(str(root / TAG / f'{ENTRY.stem}.pth.zip'))
    s = Server(root)
    monkeypatch.setenv(zoo.URL_ENV, s.url)
    yield s
    s.close()


def assert_is_the_fixture(directory):
    model, variables, meta = checkpoint.load_teacher(directory)
    _, expected = convert.load_pytorchcv(FIXTURE)   # the same file, converted directly
    jax.tree.map(np.testing.assert_array_equal, expected, variables)
    assert (meta['depth'], meta['num_classes'], meta['data']['name']) == (8, 10, 'cifar10')


def test_table_holds_the_papers_files():
    assert zoo.zoo_file('pytorchcv:resnet20_cifar100').url(zoo.ZOO_URL) == (
        'https://github.com/osmr/imgclsmob/releases/download/v0.0.180/resnet20_cifar100-2964-a5322afe.pth.zip')
    stems = {n: (f.stem, f.tag) for n, f in zoo.ZOO_FILES.items()}
    assert stems['resnet18'] == ('resnet18-0982-0126861b', 'v0.0.153')   # not PyPI pytorchcv's newer 0896
    assert stems['resnet50'] == ('resnet50-0633-b00d1c8e', 'v0.0.329')
    assert stems['mobilenetv2_w1'] == ('mobilenetv2_w1-0887-13a021bc', 'v0.0.213')
    assert stems['resnet20_cifar10'] == ('resnet20_cifar10-0597-9b0024ac', 'v0.0.163')
    assert all(len(f.sha1) == 40 and int(f.sha1, 16) >= 0 for f in zoo.ZOO_FILES.values())


def test_downloads_checks_converts_once_then_reuses(server, cache, monkeypatch):
    directory = zoo.teacher_checkpoint(SPEC)
    assert directory == str(cache / ENTRY.stem) and server.hits == 1
    assert_is_the_fixture(directory)
    assert sorted(os.listdir(cache)) == [ENTRY.stem, f'{ENTRY.stem}.pth.zip']   # no temporary names left

    monkeypatch.setattr(convert, 'convert', lambda *a, **k: pytest.fail('converted again'))
    monkeypatch.setattr(zoo, 'file_sha1', lambda *a, **k: pytest.fail('hashed again'))
    assert zoo.teacher_checkpoint(SPEC) == directory
    assert server.hits == 1


def test_wrong_checksum_is_set_aside_and_refused(server, cache):
    damaged = bytearray(PTH)
    damaged[-1] ^= 0xFF
    served = os.path.join(server.root, TAG, f'{ENTRY.stem}.pth.zip')
    write_zoo_zip(served, bytes(damaged))
    target = cache / f'{ENTRY.stem}.pth.zip'
    with pytest.raises(zoo.ZooChecksumError) as error:
        zoo.teacher_checkpoint(SPEC)
    message = str(error.value)
    assert f'is {hashlib.sha1(damaged).hexdigest()}, expected {ENTRY.sha1}' in message
    assert str(target) in message and f'{target}.bad' in message
    assert sorted(os.listdir(cache)) == [f'{ENTRY.stem}.pth.zip.bad']   # nothing a later call trusts

    write_zoo_zip(served)   # the zoo serves the right file again: the next call downloads it anew
    assert zoo.teacher_checkpoint(SPEC) == str(cache / ENTRY.stem)
    assert server.hits == 2


def test_wrong_file_placed_by_hand_is_refused_without_downloading(server, cache):
    os.makedirs(cache)
    (cache / f'{ENTRY.stem}.pth').write_bytes(PTH[:-10])
    with pytest.raises(zoo.ZooChecksumError, match=r'the SHA-1 of .*\.pth is [0-9a-f]{40}, expected'):
        zoo.teacher_checkpoint(SPEC)
    assert (cache / f'{ENTRY.stem}.pth.bad').exists() and not (cache / f'{ENTRY.stem}.pth').exists()
    assert server.hits == 0


def test_a_zip_without_the_pth_is_refused(server, cache):
    write_zoo_zip(os.path.join(server.root, TAG, f'{ENTRY.stem}.pth.zip'), inner='other.pth')
    with pytest.raises(zoo.ZooChecksumError, match=r"holds \['other.pth'\], not resnet8_cifar10-0000-"):
        zoo.teacher_checkpoint(SPEC)


@pytest.mark.parametrize('placed', ['.pth', '.pth.zip'])
def test_file_placed_by_hand_works_offline(cache, placed):
    os.makedirs(cache)
    if placed == '.pth':
        (cache / f'{ENTRY.stem}.pth').write_bytes(PTH)
    else:
        write_zoo_zip(str(cache / f'{ENTRY.stem}.pth.zip'))
    assert_is_the_fixture(zoo.teacher_checkpoint(SPEC))


def test_offline_fails_at_once_saying_where_to_put_the_file(cache):
    start = time.monotonic()
    with pytest.raises(zoo.ZooUnavailableError) as error:
        zoo.teacher_checkpoint(SPEC)
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert os.path.join(str(cache), f'{ENTRY.stem}.pth.zip') in message
    assert f'{os.environ[zoo.URL_ENV]}/{TAG}/{ENTRY.stem}.pth.zip failed' in message   # the URL tried
    assert f'download {zoo.ZOO_URL}/{TAG}/{ENTRY.stem}.pth.zip and copy it to' in message   # the zoo's own
    assert 'Connection refused' in message or 'ConnectionRefused' in message or 'Errno' in message
    assert not cache.exists() or os.listdir(cache) == []


def test_missing_on_the_server_fails_the_same_way(server, cache):
    os.remove(os.path.join(server.root, TAG, f'{ENTRY.stem}.pth.zip'))
    with pytest.raises(zoo.ZooUnavailableError, match=r'HTTPError: .*copy it to .*\.pth\.zip'):
        zoo.teacher_checkpoint(SPEC)
    assert os.listdir(cache) == []


def test_interrupted_conversion_is_redone(server, cache, monkeypatch):
    real_convert = convert.convert

    def killed_after_writing(path, out, *args, **kwargs):
        real_convert(path, out, *args, **kwargs)
        raise KeyboardInterrupt('killed before the rename')
    monkeypatch.setattr(convert, 'convert', killed_after_writing)
    with pytest.raises(KeyboardInterrupt):
        zoo.teacher_checkpoint(SPEC)
    assert not checkpoint.is_teacher_checkpoint(str(cache / ENTRY.stem))
    assert checkpoint.is_teacher_checkpoint(str(cache / ENTRY.stem) + zoo.CONVERTING_SUFFIX)

    monkeypatch.setattr(convert, 'convert', real_convert)
    assert_is_the_fixture(zoo.teacher_checkpoint(SPEC))
    assert server.hits == 1   # the checked file was kept
    assert sorted(os.listdir(cache)) == [ENTRY.stem, f'{ENTRY.stem}.pth.zip']


def test_other_processes_never_download(server, cache, monkeypatch):
    monkeypatch.setattr(jax, 'process_index', lambda: 1)
    with pytest.raises(zoo.ZooUnavailableError, match='process 0 could not fetch'):
        zoo.teacher_checkpoint(SPEC)
    assert server.hits == 0


def test_unknown_name_lists_the_known_ones(cache):
    with pytest.raises(ValueError, match=r"'pytorchcv:resnet19' names no pytorchcv zoo file.*pytorchcv:resnet20_cifar100, "
                                         r'.*pytorchcv:resnet18, pytorchcv:resnet50, pytorchcv:mobilenetv2_w1'):
        zoo.teacher_checkpoint('pytorchcv:resnet19')
    c = cifar100_w3a3.get_config()
    c.teacher.checkpoint = 'pytorchcv:resnet19'
    with pytest.raises(ValueError, match=r"teacher.checkpoint='pytorchcv:resnet19' names no"):
        settings.parse(c)
    c.teacher.checkpoint = 'pytorchcv:resnet20_cifar100'
    settings.parse(c)


def test_ensure_teacher_takes_the_zoo_path(server, cache, tmp_path, monkeypatch):
    monkeypatch.setattr(teacher, 'train_teacher', lambda *a, **k: pytest.fail('trained a teacher'))
    c = tiny_config()
    c.teacher.checkpoint = SPEC
    assert teacher.ensure_teacher(settings.parse(c), str(tmp_path / 'run')) == str(cache / ENTRY.stem)
    assert server.hits == 1


def test_command_line(server, cache, tmp_path, capsys):
    other = tmp_path / 'elsewhere'
    assert zoo.main([ENTRY.name, '--cache_dir', str(other)]) == 0
    assert capsys.readouterr().out.strip() == str(other / 'pytorchcv' / ENTRY.stem)
    shutil.rmtree(other)
    server.close()
    assert zoo.main([SPEC, '--cache_dir', str(other)]) == 1
    err = capsys.readouterr().err
    assert err.startswith('python -m bag_jax.zoo: error: ') and 'copy it to' in err


def test_evaluate_mode_takes_the_zoo_path(server, cache, tmp_path):
    """`--config.checkpoint=pytorchcv:NAME` in the evaluate mode: the converted zoo teacher scores
    an npz of CIFAR-shaped images (the fixture is a 10-class 32x32 network)."""
    from bag_jax import evaluate
    from configs import evaluate as evaluate_config
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    y = np.arange(12) % 10
    np.savez(tmp_path / 'images.npz', x_train=x, y_train=y, x_test=x, y_test=y)
    c = evaluate_config.get_config()
    c.checkpoint, c.eval_batch_size = SPEC, 4
    c.data.name, c.data.npz_path = 'npz', str(tmp_path / 'images.npz')
    summary = evaluate.run_evaluation(settings.parse(c), str(tmp_path / 'eval'))
    assert summary['checkpoint'] == str(cache / ENTRY.stem) and summary['images'] == 12
    assert server.hits == 1

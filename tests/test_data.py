"""Tests for bag_jax/data/: the sources and their registry, their error messages, preprocessing and
batching.

No network: the CIFAR sources run under tfds.testing.mock_data, and on a tiny fake CIFAR-100
prepared from the binary format into a temporary tfds directory.
"""

import ast
import json
import os
import re
import socket
import time
from types import SimpleNamespace
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bag_jax import data


def data_config(name, **fields):
    c = ml_collections.ConfigDict({'name': name, 'npz_path': None, 'tfds_dir': None})
    for k, v in fields.items():
        c[k] = v
    return c


@pytest.fixture(scope='module')
def tfds():
    pytest.importorskip('tensorflow')
    _, tfds = data.tfds_cifar.import_tfds()
    return tfds


# ------------------------------------------------------------------------------------------------
# cifar100 / cifar10


@pytest.mark.parametrize('name, num_classes, mean, std', [
    ('cifar100', 100, (0.50705882, 0.48666667, 0.44078431), (0.26745098, 0.25568627, 0.27607843)),
    ('cifar10', 10, (0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768)),
])
def test_cifar_under_mock_data(tfds, tmp_path, name, num_classes, mean, std):
    with tfds.testing.mock_data(num_examples=6):
        ds = data.load_dataset(data_config(name, tfds_dir=str(tmp_path)), process_index=0,
                               process_count=1)
    assert ds.x_train.shape == (6, 32, 32, 3) and ds.x_train.dtype == np.uint8
    assert ds.y_train.shape == (6,) and ds.y_train.dtype == np.int32
    assert ds.x_test.shape == (6, 32, 32, 3) and ds.x_test.dtype == np.uint8
    assert ds.y_test.shape == (6,) and ds.y_test.dtype == np.int32
    assert ds.num_test_total == 6
    assert 0 <= ds.y_train.min() and ds.y_train.max() < num_classes
    assert ds.info == data.DatasetInfo(name=name, num_classes=num_classes, image_shape=(32, 32, 3),
                                       mean=mean, std=std, augment='crop_flip')


def _write_fake_cifar100_binary(root, num_train, num_test):
    """Writes cifar-100-binary/ as the Toronto tarball holds it; image i is constant, of value i."""
    folder = os.path.join(root, 'cifar-100-binary')
    os.makedirs(folder)
    marker = 0
    for filename, n in (('train.bin', num_train), ('test.bin', num_test)):
        records = []
        for _ in range(n):
            # coarse label, fine label, then 3072 bytes of CHW pixels.
            records.append(bytes([marker % 20, marker % 100]) + bytes([marker]) * 3072)
            marker += 1
        with open(os.path.join(folder, filename), 'wb') as f:
            f.write(b''.join(records))
    for filename, n in (('coarse_label_names.txt', 20), ('fine_label_names.txt', 100)):
        with open(os.path.join(folder, filename), 'w') as f:
            f.write('\n'.join(f'class{i}' for i in range(n)))


NUM_FAKE_TRAIN, NUM_FAKE_TEST = 12, 7


@pytest.fixture(scope='module')
def prepared_tfds_dir(tfds, tmp_path_factory):
    """A tfds data_dir holding a tiny fake cifar100, prepared by the real builder."""
    root = tmp_path_factory.mktemp('fake_cifar')
    source = root / 'source'
    _write_fake_cifar100_binary(str(source), NUM_FAKE_TRAIN, NUM_FAKE_TEST)
    data_dir = str(root / 'tfds')
    with mock.patch.object(tfds.download.DownloadManager, 'download_and_extract',
                           lambda self, url: str(source)):
        tfds.builder('cifar100', data_dir=data_dir).download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                compute_stats=tfds.download.ComputeStatsMode.SKIP))
    return data_dir


def test_cifar_prepared_copy_per_process_shares(prepared_tfds_dir, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError('the loader touched the network although data.tfds_dir was given')
    monkeypatch.setattr(socket, 'getaddrinfo', no_network)
    config = data_config('cifar100', tfds_dir=prepared_tfds_dir)

    whole = data.load_dataset(config, process_index=0, process_count=1)
    assert whole.x_train.shape == (NUM_FAKE_TRAIN, 32, 32, 3)
    # Image i is constant i; its fine label is i % 100 (the fake writer's convention).
    markers = whole.x_train[:, 0, 0, 0]
    assert (whole.x_train == markers[:, None, None, None]).all()
    np.testing.assert_array_equal(whole.y_train, markers % 100)
    assert sorted(markers) == list(range(NUM_FAKE_TRAIN))
    assert whole.num_test_total == NUM_FAKE_TEST
    test_markers = sorted(whole.x_test[:, 0, 0, 0])
    assert test_markers == list(range(NUM_FAKE_TRAIN, NUM_FAKE_TRAIN + NUM_FAKE_TEST))

    shares = [data.load_dataset(config, process_index=p, process_count=3) for p in range(3)]
    assert [len(s.x_test) for s in shares] == [3, 2, 2]   # as np.array_split lays out 7 over 3
    for s in shares:
        assert s.num_test_total == NUM_FAKE_TEST
        np.testing.assert_array_equal(s.x_train, whole.x_train)   # every process: the full train split
    share_markers = np.concatenate([s.x_test[:, 0, 0, 0] for s in shares])
    np.testing.assert_array_equal(share_markers, whole.x_test[:, 0, 0, 0])   # cover, no overlap
    np.testing.assert_array_equal(np.concatenate([s.y_test for s in shares]), whole.y_test)
    assert len({len(list(data.eval_batches(s, 2, process_count=3))) for s in shares}) == 1


def test_cifar_empty_tfds_dir_fails_at_once(tfds, tmp_path):
    start = time.monotonic()
    with pytest.raises(data.DatasetUnavailableError) as info:
        data.load_dataset(data_config('cifar100', tfds_dir=str(tmp_path)), process_index=0,
                          process_count=1)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert 'cifar100' in message and 'data.tfds_dir' in message and 'download_and_prepare' in message
    assert f"tfds.builder('cifar100', data_dir='{tmp_path}').download_and_prepare()" in message
    assert info.value.__cause__ is not None


def test_cifar_missing_tfds_dir(tfds, tmp_path):
    with pytest.raises(data.DatasetUnavailableError, match=r'data\.tfds_dir=.*does not exist'):
        data.load_dataset(data_config('cifar10', tfds_dir=str(tmp_path / 'nope')), process_index=0,
                          process_count=1)


def test_cifar_offline_without_tfds_dir_fails_without_retries(tfds, monkeypatch):
    if tfds.builder('cifar100').is_prepared():
        pytest.skip('cifar100 is prepared in the default tfds directory of this machine')

    def unreachable(*args, **kwargs):
        raise socket.gaierror(-2, 'Name or service not known')

    def no_load(*args, **kwargs):
        raise AssertionError('tfds.load would try the download and retry for minutes')
    monkeypatch.setattr(socket, 'getaddrinfo', unreachable)
    monkeypatch.setattr(tfds, 'load', no_load)
    with pytest.raises(data.DatasetUnavailableError,
                       match=r'(?s)cannot be reached.*download_and_prepare.*--config\.data\.tfds_dir=DIR'):
        data.load_dataset(data_config('cifar100'), process_index=0, process_count=1)


# ------------------------------------------------------------------------------------------------
# digits


def test_digits():
    from sklearn.datasets import load_digits
    ds = data.load_dataset(data_config('digits'), process_index=0, process_count=1)
    assert ds.x_train.shape == (1347, 8, 8, 1) and ds.x_test.shape == (450, 8, 8, 1)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32
    assert ds.num_test_total == 450
    assert ds.info.num_classes == 10 and ds.info.image_shape == (8, 8, 1) and ds.info.augment == 'none'
    for y in (ds.y_train, ds.y_test):
        assert set(y) == set(range(10))
    # Pixels 0..16 become round(v * 255 / 16); the two splits hold every digit once.
    levels = {round(v * 255 / 16) for v in range(17)}
    assert set(np.unique(ds.x_train)) <= levels and ds.x_train.max() == 255
    reference = load_digits()
    np.testing.assert_array_equal(np.bincount(np.concatenate([ds.y_train, ds.y_test])),
                                  np.bincount(reference.target))
    assert ds.x_train.astype(np.int64).sum() + ds.x_test.astype(np.int64).sum() == sum(
        round(v * 255 / 16) for v in reference.images.ravel())
    # mean/std: numpy on the train split in [0, 1] units.
    pixels = ds.x_train.astype(np.float64) / 255.0
    np.testing.assert_allclose(ds.info.mean, [pixels.mean()], rtol=1e-10)
    np.testing.assert_allclose(ds.info.std, [pixels.std()], rtol=1e-10)
    again = data.load_dataset(data_config('digits'), process_index=0, process_count=1)
    for a, b in ((ds.x_train, again.x_train), (ds.y_train, again.y_train), (ds.x_test, again.x_test)):
        np.testing.assert_array_equal(a, b)
    assert again.info == ds.info


def test_digits_fraction_and_shares():
    config = data_config('digits', digits_test_fraction=0.5)
    whole = data.load_dataset(config, process_index=0, process_count=1)
    assert len(whole.x_train) == 898 and whole.num_test_total == 899
    shares = [data.load_dataset(config, process_index=p, process_count=2) for p in range(2)]
    assert [len(s.y_test) for s in shares] == [450, 449]
    np.testing.assert_array_equal(np.concatenate([s.x_test for s in shares]), whole.x_test)
    np.testing.assert_array_equal(np.concatenate([s.y_test for s in shares]), whole.y_test)


@pytest.mark.parametrize('fraction', [0.0, 1.5, 0.001])
def test_digits_bad_fraction(fraction):
    with pytest.raises(ValueError, match=r'data\.digits_test_fraction'):
        data.load_dataset(data_config('digits', digits_test_fraction=fraction), process_index=0,
                          process_count=1)


# ------------------------------------------------------------------------------------------------
# npz


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_npz_grayscale(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (10, 6, 5), dtype=np.uint8)
    x_test = rng.integers(0, 256, (5, 6, 5), dtype=np.uint8)
    path = write_npz(tmp_path / 'd.npz', x_train=x_train, y_train=np.arange(10) % 5,
                     x_test=x_test, y_test=np.array([0, 1, 4, 2, 1]))
    ds = data.load_dataset(data_config('npz', npz_path=path), process_index=0, process_count=1)
    assert ds.info.num_classes == 5 and ds.info.image_shape == (6, 5, 1) and ds.info.augment == 'none'
    np.testing.assert_array_equal(ds.x_train, x_train[..., None])
    np.testing.assert_array_equal(ds.y_test, [0, 1, 4, 2, 1])
    assert ds.y_train.dtype == np.int32 and ds.num_test_total == 5
    np.testing.assert_allclose(ds.info.mean, [x_train.mean() / 255.0], rtol=1e-10)
    np.testing.assert_allclose(ds.info.std, [(x_train / 255.0).std()], rtol=1e-10)
    second = data.load_dataset(data_config('npz', npz_path=path), process_index=1, process_count=2)
    np.testing.assert_array_equal(second.x_test, x_test[3:, ..., None])


def test_npz_color(tmp_path):
    rng = np.random.default_rng(1)
    x_train = rng.integers(0, 256, (9, 4, 7, 2), dtype=np.uint8)
    path = write_npz(tmp_path / 'd.npz', x_train=x_train, y_train=(np.arange(9) % 2).reshape(9, 1).astype(np.int64),
                     x_test=x_train[:3], y_test=np.zeros(3, np.uint8))
    ds = data.load_dataset(data_config('npz', npz_path=path), process_index=0, process_count=1)
    assert ds.info.image_shape == (4, 7, 2)
    assert ds.info.num_classes == 2
    assert ds.y_train.shape == (9,) and ds.y_train.dtype == np.int32
    pixels = x_train.astype(np.float64) / 255.0
    np.testing.assert_allclose(ds.info.mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-10)
    np.testing.assert_allclose(ds.info.std, pixels.std(axis=(0, 1, 2)), rtol=1e-10)


def good_arrays():
    return dict(x_train=np.zeros((10, 8, 8), np.uint8), y_train=np.arange(10) % 2,
                x_test=np.zeros((4, 8, 8), np.uint8), y_test=np.arange(4) % 2)


def with_changes(**changes):
    arrays = good_arrays()
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


@pytest.mark.parametrize('arrays, pattern', [
    (with_changes(x_test=None, y_test=None),
     r'lacks the arrays x_test, y_test \(it has: x_train, y_train\); '
     r'required: x_train, y_train, x_test, y_test'),
    (with_changes(y_train=np.linspace(0, 1, 10)),
     r'y_train has dtype float64; labels must be integers'),
    (with_changes(y_test=np.array([0, -1, 1, 0])),
     r'y_test holds negative labels'),
    (with_changes(y_train=np.zeros(9, int)),
     r'the train split has 10 images \(x_train\) but 9 labels'),
    (with_changes(x_test=np.zeros((4, 8, 8), np.float32)),
     r'x_test has dtype float32; images must be uint8 in 0\.\.255'),
    (with_changes(x_train=np.zeros((10, 64), np.uint8)),
     r'x_train has shape \(10, 64\); images must be \(N, H, W\) or \(N, H, W, C\)'),
    (with_changes(x_test=np.zeros((4, 8, 9), np.uint8)),
     r'train images are \(8, 8, 1\) but test images are \(8, 9, 1\)'),
    (with_changes(x_test=np.zeros((0, 8, 8), np.uint8), y_test=np.zeros(0, int)),
     r'x_test is empty'),
    (with_changes(x_train=np.zeros((10, 3, 3), np.uint8), x_test=np.zeros((4, 3, 3), np.uint8)),
     r'images are 3x3; the models need at least 4x4'),
    (with_changes(y_train=np.full(10, 3), y_test=np.full(4, 3)),
     r'y_train holds 1 class\(es\) \(\[3\]\); a classifier needs at least 2'),
    (with_changes(y_test=np.array([0, 1, 2, 7])),
     r'y_test holds label\(s\) \[2, 7\] that y_train does not; the classes are those of the training split '
     r'\(2 labels, 0 to 1\)'),
])
def test_npz_bad_contents(tmp_path, arrays, pattern):
    path = write_npz(tmp_path / 'd.npz', **arrays)
    with pytest.raises(ValueError, match=r'data\.npz_path=.*' + pattern):
        data.load_dataset(data_config('npz', npz_path=path), process_index=0, process_count=1)


def test_npz_bad_files(tmp_path):
    load = lambda config: data.load_dataset(config, process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r'data\.name=npz needs data\.npz_path'):
        load(data_config('npz'))
    with pytest.raises(FileNotFoundError, match=r'data\.npz_path=.*no such file'):
        load(data_config('npz', npz_path=str(tmp_path / 'missing.npz')))
    garbage = tmp_path / 'garbage.npz'
    garbage.write_bytes(b'PK\x03\x04 this is not a zip archive')
    with pytest.raises(ValueError, match=r'data\.npz_path=.*is not a readable \.npz file'):
        load(data_config('npz', npz_path=str(garbage)))
    single = tmp_path / 'single.npz'
    with open(single, 'wb') as f:
        np.save(f, np.zeros(3))
    with pytest.raises(ValueError, match=r'not a readable \.npz file \(it holds a single array'):
        load(data_config('npz', npz_path=str(single)))


def test_npz_path_that_is_not_an_npz_says_so_and_what_it_must_hold(tmp_path):
    """A text file, a pickle or an empty file given as data.npz_path: np.load would answer with
    its allow_pickle message; the message says the file is not an .npz and what it must hold."""
    load = lambda path: data.load_dataset(data_config('npz', npz_path=str(path)), process_index=0, process_count=1)
    (tmp_path / 'labels.csv').write_text('x,y\n1,2\n')
    import pickle
    (tmp_path / 'd.pkl').write_bytes(pickle.dumps({'x_train': [1]}))
    (tmp_path / 'empty.npz').write_bytes(b'')
    for name, what in (('labels.csv', r"it is not a zip archive, as np.savez writes \(it begins with b'x,y"),
                       ('d.pkl', 'it is not a zip archive'), ('empty.npz', 'it is empty')):
        path = tmp_path / name
        with pytest.raises(ValueError) as e:
            load(path)
        message = str(e.value)
        assert message.startswith(f'data.npz_path={str(path)!r} is not an .npz file (numpy.savez): '), message
        assert re.search(what, message), message
        assert 'It must hold the arrays x_train, y_train, x_test, y_test' in message and 'pickle' not in message


def test_unknown_source():
    with pytest.raises(ValueError, match=r"data\.name='imagenet' .*allowed: cifar100, cifar10, digits, npz"):
        data.load_dataset(data_config('imagenet'), process_index=0, process_count=1)


# ------------------------------------------------------------------------------------------------
# DatasetInfo, normalize, augment


def test_dataset_info_round_trip():
    info = data.DatasetInfo('digits', 10, (8, 8, 1), (0.3,), (0.4,), 'none')
    again = data.DatasetInfo.from_dict(json.loads(json.dumps(info.to_dict())))
    assert again == info and hash(again) == hash(info)
    with pytest.raises(ValueError, match='augment'):
        data.DatasetInfo('digits', 10, (8, 8, 1), (0.3,), (0.4,), 'mixup')


def test_normalize_by_hand():
    info = data.DatasetInfo('c', 10, (1, 2, 3), data.CIFAR10_MEAN, data.CIFAR10_STD, 'crop_flip')
    images = np.array([[[[255, 0, 128], [1, 2, 3]]]], np.uint8)
    expected = [[[[(v / 255 - m) / s for v, m, s in zip(pixel, data.CIFAR10_MEAN, data.CIFAR10_STD)]
                  for pixel in images[0, 0]]]]
    for out in (data.normalize(images, info), data.normalize(jnp.asarray(images), info),
                jax.jit(data.normalize, static_argnums=1)(images, info)):
        assert out.dtype == jnp.float32 and out.shape == images.shape
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_augment_none_is_identity():
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(data.augment(jax.random.key(0), images, 'none'), images)
    with pytest.raises(ValueError, match='crop_flip'):
        data.augment(jax.random.key(0), images, 'cutout')


def crop_flip_candidates(image):
    """Yields ((dy, dx, flipped), output) for every output crop_flip can make of `image`."""
    h, w, _ = image.shape
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    for dy in range(9):
        for dx in range(9):
            crop = padded[dy:dy + h, dx:dx + w]
            yield (dy, dx, False), crop
            yield (dy, dx, True), crop[:, ::-1]


def test_crop_flip_against_numpy():
    # Values 1..255 so the zero padding is told apart from the image.
    images = np.random.default_rng(0).integers(1, 256, (16, 8, 6, 3), dtype=np.uint8)
    key = jax.random.key(42)
    out = np.asarray(data.augment(key, images, 'crop_flip'))
    assert out.shape == images.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, data.augment(key, images, 'crop_flip'))   # deterministic
    jitted = jax.jit(data.augment, static_argnames='kind')(key, jnp.asarray(images), kind='crop_flip')
    np.testing.assert_array_equal(out, jitted)
    assert not np.array_equal(out, data.augment(jax.random.key(43), images, 'crop_flip'))

    params = []
    for image, result in zip(images, out):
        matches = [p for p, candidate in crop_flip_candidates(image) if np.array_equal(candidate, result)]
        assert len(matches) == 1, 'the output is no pad-4 crop (flipped or not) of its input'
        params.append(matches[0])
    assert any(flipped for _, _, flipped in params) and not all(flipped for _, _, flipped in params)
    assert any((dy, dx) != (4, 4) for dy, dx, _ in params)
    assert len({(dy, dx) for dy, dx, _ in params}) > 1   # each image gets its own offset


# ------------------------------------------------------------------------------------------------
# train_batches, eval_batches


def marked_dataset(num_train, num_test=4, num_test_total=None):
    """Image i of each split is constant i, with label i."""
    def split(n):
        return (np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 4, 4, 1)).copy(),
                np.arange(n, dtype=np.int32))
    x_train, y_train = split(num_train)
    x_test, y_test = split(num_test)
    info = data.DatasetInfo('npz', num_train, (4, 4, 1), (0.5,), (0.5,), 'none')
    return data.ArrayDataset(info, x_train, y_train, x_test, y_test,
                             num_test_total=num_test if num_test_total is None else num_test_total)


def test_train_batches_global_order():
    ds = marked_dataset(50)
    assert data.steps_per_epoch(ds, 8) == 6
    one = list(data.train_batches(ds, 8, seed=3, epoch=1, process_index=0, process_count=1))
    assert len(one) == 6   # 50 = 6 * 8 + 2: the last incomplete batch is dropped
    perm = np.random.default_rng([3, 1]).permutation(50)
    for b, (x, y) in enumerate(one):
        assert x.shape == (8, 4, 4, 1) and x.dtype == np.uint8 and y.dtype == np.int32
        np.testing.assert_array_equal(y, perm[b * 8:(b + 1) * 8])
        np.testing.assert_array_equal(x[:, 0, 0, 0], y)
    seen = np.concatenate([y for _, y in one])
    assert len(set(seen)) == 48   # no image twice in an epoch

    two = [list(data.train_batches(ds, 8, seed=3, epoch=1, process_index=p, process_count=2))
           for p in range(2)]
    assert len(two[0]) == len(two[1]) == 6
    for (x, y), (x0, y0), (x1, y1) in zip(one, *two):
        assert x0.shape == (4, 4, 4, 1)
        np.testing.assert_array_equal(np.concatenate([x0, x1]), x)
        np.testing.assert_array_equal(np.concatenate([y0, y1]), y)

    again = list(data.train_batches(ds, 8, seed=3, epoch=1, process_index=0, process_count=1))
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(one, again))
    other_epoch = list(data.train_batches(ds, 8, seed=3, epoch=2, process_index=0, process_count=1))
    assert not np.array_equal(seen, np.concatenate([y for _, y in other_epoch]))
    other_seed = list(data.train_batches(ds, 8, seed=4, epoch=1, process_index=0, process_count=1))
    assert not np.array_equal(seen, np.concatenate([y for _, y in other_seed]))


def test_train_batches_bad_sizes():
    ds = marked_dataset(10)
    with pytest.raises(ValueError, match='multiple of the process count 4'):
        next(data.train_batches(ds, 6, seed=0, epoch=0, process_index=0, process_count=4))
    with pytest.raises(ValueError, match='exceeds the 10 training images'):
        data.steps_per_epoch(ds, 16)


def test_eval_batches_pad_mask_and_equal_counts():
    total = 11
    whole = marked_dataset(8, total)
    shares = np.array_split(np.arange(total), 3)   # 4, 4, 3
    seen, counts = [], []
    for rows in shares:
        ds = data.ArrayDataset(whole.info, whole.x_train, whole.y_train, whole.x_test[rows],
                               whole.y_test[rows], num_test_total=total)
        batches = list(data.eval_batches(ds, 3, process_count=3))
        counts.append(len(batches))
        for x, y, mask in batches:
            assert x.shape == (3, 4, 4, 1) and x.dtype == np.uint8
            assert y.shape == (3,) and y.dtype == np.int32 and mask.dtype == bool
            assert (x[~mask] == 0).all() and (y[~mask] == 0).all()
            np.testing.assert_array_equal(x[mask][:, 0, 0, 0], y[mask])
            seen.extend(y[mask])
        assert [m.sum() for _, _, m in batches] == [min(3, len(rows)), len(rows) - min(3, len(rows))]
    assert counts == [2, 2, 2]
    assert sorted(seen) == list(range(total))   # each example exactly once

    # A share much shorter than the others still yields as many (all-False) batches.
    short = data.ArrayDataset(whole.info, whole.x_train, whole.y_train, whole.x_test[:1],
                              whole.y_test[:1], num_test_total=total)
    masks = [m for _, _, m in data.eval_batches(short, 2, process_count=3)]
    assert [m.sum() for m in masks] == [1, 0]
    with pytest.raises(ValueError, match='another process count'):
        next(data.eval_batches(whole, 3, process_count=3))


# ------------------------------------------------------------------------------------------------
# The registry (bag_jax/data/sources.py): the one list of sources


def test_every_source_loads_or_describes_through_the_registry(tmp_path):
    npz_path = write_npz(tmp_path / 'd.npz', **good_arrays())
    for name in data.SOURCES:
        source = data.source(name)
        # Any object with the attributes will do (a ConfigDict, a dataclass).
        config = SimpleNamespace(name=name, npz_path=npz_path, digits_test_fraction=None, image_size=None)
        if source.info is not None:     # known without loading: the ImageNet-style ones and CIFAR
            info = data.dataset_info(config)
        else:
            ds = data.load_dataset(config, process_index=0, process_count=1)
            assert isinstance(ds, data.ArrayDataset) and data.dataset_info(config, process_index=0,
                                                                             process_count=1) == ds.info
            info = ds.info
        assert info.name == name and source.streaming == (name in data.STREAMING_SOURCES)
        assert source.has_train_split == (not source.streaming) and set(source.fields) < set(data.DATA_FIELDS)
    assert data.class_names(data.cifar_info('cifar10'))[3] == 'cat'
    with pytest.raises(ValueError, match=r"'digits' is not a CIFAR dataset; use one of cifar100, cifar10\."):
        data.cifar_info('digits')


def test_the_lists_of_sources_derive_from_the_registry():
    from bag_jax import checkpoint, convert
    fields = {f for source in data.REGISTRY.values() for f in source.fields}
    assert checkpoint.DATA_FIELDS == data.DATA_FIELDS and set(checkpoint.DATA_FIELDS) == fields | {'name'}
    assert len(set(checkpoint.DATA_FIELDS)) == len(checkpoint.DATA_FIELDS)
    for name, source in data.REGISTRY.items():
        record = checkpoint.data_record(SimpleNamespace(name=name))
        assert tuple(record) == ('name', *source.fields)
    assert convert._DATASETS == data.family('cifar') == ('cifar100', 'cifar10')
    assert data.STREAMING_SOURCES == tuple(n for n, s in data.REGISTRY.items() if s.streaming)


def literal_lists_of_sources(text):
    """The line numbers of the tuple, list, set or dict (keys) literals in Python source `text`
    that hold two or more quoted source names."""
    found = []
    for node in ast.walk(ast.parse(text)):
        items = node.keys if isinstance(node, ast.Dict) else getattr(node, 'elts', [])
        names = [i.value for i in items if isinstance(i, ast.Constant) and i.value in data.SOURCES]
        if len(names) >= 2:
            found.append(node.lineno)
    return found


def test_no_module_but_the_registry_lists_sources():
    assert literal_lists_of_sources("x = {'cifar10': 1,\n     'npz': 2}\nif n in ('digits', 'imagefolder'): pass") == [1, 3]
    assert literal_lists_of_sources("SOURCES = ('cifar100',)\nmessage = 'data.name=cifar100/cifar10'") == []
    package = os.path.dirname(os.path.abspath(data.__path__[0]))
    registry = os.path.join(package, 'data', 'sources.py')
    listed = {}
    for folder, _, files in os.walk(package):
        for f in files:
            path = os.path.join(folder, f)
            if f.endswith('.py') and path != registry:
                with open(path) as file:
                    lines = literal_lists_of_sources(file.read())
                if lines:
                    listed[os.path.relpath(path, package)] = lines
    assert not listed, f'source names listed outside bag_jax/data/sources.py (file: lines): {listed}'

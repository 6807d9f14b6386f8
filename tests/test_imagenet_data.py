"""Tests for the ImageNet evaluation sources of bag_jax/data/: the reference's transform
(docs/imagenet.md 6), `imagefolder`, `imagenet2012` and the streamed, sharded eval batches.

No network and no ImageNet: the images are small random JPEG/PNG files written here; the
imagenet2012 tests prepare a 7-image imagenet2012 with tfds itself, from a fake
ILSVRC2012_img_val.tar (tfds builds the validation split from that archive alone).
"""

import dataclasses
import io
import os
import socket
import tarfile
from unittest import mock

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from bag_jax import checkpoint, data, evaluate, parallel, settings
from configs import base

WNIDS = data.imagenet_class_ids()


def data_config(name, **fields):
    return ml_collections.ConfigDict({'name': name, 'npz_path': None, 'tfds_dir': None,
                                      'imagefolder_dir': None, 'image_size': 224, **fields})


def write_image(path, size, rng, fmt='JPEG', mode='RGB'):
    """A random image of `size` (w, h) in `mode`, saved as `fmt`."""
    w, h = size
    channels = {'RGB': 3, 'RGBA': 4, 'L': 1}[mode]
    pixels = rng.integers(0, 256, (h, w, channels), np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)   # L, RGB or RGBA
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, fmt)
    return path


# ------------------------------------------------------------------------------------------------
# The class list and the transform


def test_imagenet_classes_file():
    assert len(WNIDS) == len(set(WNIDS)) == 1000 == data.IMAGENET_CLASSES
    assert list(WNIDS) == sorted(WNIDS)
    assert all(len(w) == 9 and w[0] == 'n' and w[1:].isdigit() for w in WNIDS)
    assert (WNIDS[0], WNIDS[-1]) == ('n01440764', 'n15075141')   # tench ... toilet tissue
    tfds = pytest.importorskip('tensorflow_datasets')
    labels = os.path.join(os.path.dirname(tfds.__file__), 'datasets', 'imagenet2012', 'labels.txt')
    with open(labels) as f:
        assert tuple(f.read().split()) == WNIDS   # the order of tfds's imagenet2012 ClassLabel


# (w, h, crop) -> (resized w, h, crop left, top), by hand from torchvision's rules: the shorter
# side becomes round(crop * 256 / 224), the longer floor(that * long / short); the crop corner is
# round((size - crop) / 2) with Python's round half to even (58.5 -> 58, 57.5 -> 58).
GEOMETRY = [
    ((500, 375, 224), (341, 256, 58, 16)),     # landscape; 341.33 truncated
    ((375, 500, 224), (256, 341, 16, 58)),     # portrait
    ((333, 333, 224), (256, 256, 16, 16)),
    ((101, 57, 224), (453, 256, 114, 16)),     # upscaled; 453.6 truncated; 114.5 -> 114
    ((256, 300, 224), (256, 300, 16, 38)),     # shorter side already 256: not resized
    ((339, 256, 224), (339, 256, 58, 16)),     # 57.5 -> 58
    ((61, 203, 97), (111, 369, 7, 136)),       # crop 97: resize round(110.86) = 111; 369.4 truncated
    ((203, 61, 97), (369, 111, 136, 7)),
]


@pytest.mark.parametrize('case, expected', GEOMETRY)
def test_preprocess_matches_pil_directly(tmp_path, case, expected):
    w, h, crop = case
    new_w, new_h, left, top = expected
    assert data.imagenet_resize_size(crop) == min(new_w, new_h)
    rng = np.random.default_rng(w * 1000 + h)
    path = write_image(str(tmp_path / 'a.jpg'), (w, h), rng)
    want = Image.open(path).convert('RGB')
    if (new_w, new_h) != (w, h):
        want = want.resize((new_w, new_h), Image.BILINEAR)
    want = np.asarray(want.crop((left, top, left + crop, top + crop)))
    got = data.read_image(path, crop)
    assert got.shape == (crop, crop, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
    with open(path, 'rb') as f:   # encoded bytes (tfds's records) give the same
        np.testing.assert_array_equal(data.read_image(f.read(), crop), want)


def test_preprocess_geometry_on_a_marked_image():
    """A crop of a resized gradient: the pixel values say where the crop sits."""
    # 600 x 448 -> (int(342.86) = 342, 256), crop left (342 - 224) / 2 = 59, top 16.
    xs = np.arange(600) % 256
    image = Image.fromarray(np.broadcast_to(xs[None, :, None], (448, 600, 3)).astype(np.uint8))
    out = data.preprocess_image(image, 224)
    resized = np.asarray(image.resize((342, 256), Image.BILINEAR))
    np.testing.assert_array_equal(out, resized[16:240, 59:283])
    assert not np.array_equal(out, resized[16:240, 60:284])


@pytest.mark.parametrize('mode, fmt', [('L', 'PNG'), ('RGBA', 'PNG'), ('RGB', 'PNG'), ('RGB', 'BMP')])
def test_preprocess_converts_to_rgb(tmp_path, mode, fmt):
    path = write_image(str(tmp_path / f'a.{fmt.lower()}'), (70, 90), np.random.default_rng(1), fmt, mode)
    # 70 x 90, crop 112: resize to (128, int(164.57)), crop corner (8, 26).
    want = Image.open(path).convert('RGB').resize((128, 164), Image.BILINEAR).crop((8, 26, 120, 138))
    np.testing.assert_array_equal(data.read_image(path, 112), np.asarray(want))


@pytest.mark.parametrize('total', [0, 1, 5, 7, 50])
@pytest.mark.parametrize('count', [1, 2, 3, 8])
def test_share_bounds_follow_array_split(total, count):
    shares = np.array_split(np.arange(total), count)
    for p, share in enumerate(shares):
        start, stop = data.types.share_bounds(total, p, count)
        np.testing.assert_array_equal(np.arange(start, stop), share)


# ------------------------------------------------------------------------------------------------
# imagefolder


def make_imagefolder(root, classes, per_class=(3, 2, 4, 1), seed=0):
    """Writes class folders of random JPEG/PNG images of random sizes; returns the expected
    [(path, class name)] in reading order (sorted class names, then sorted paths)."""
    rng = np.random.default_rng(seed)
    expected = []
    for k, name in enumerate(classes):
        files = []
        for i in range(per_class[k % len(per_class)]):
            ext = ['.JPEG', '.jpg', '.png'][i % 3]
            sub = 'nested' if i == 2 else ''    # images may lie deeper in a class folder
            path = os.path.join(root, name, sub, f'img{i}{ext}')
            write_image(path, tuple(rng.integers(20, 90, 2)), rng, 'PNG' if ext == '.png' else 'JPEG')
            files.append(path)
        # Skipped: other extensions, hidden files (macOS's ._ files are not images).
        with open(os.path.join(root, name, 'notes.txt'), 'w') as f:
            f.write('not an image')
        with open(os.path.join(root, name, '._img0.JPEG'), 'wb') as f:
            f.write(b'\x00\x05\x16\x07 AppleDouble')
        expected += [(p, name) for p in sorted(files)]
    order = {name: i for i, name in enumerate(sorted(classes))}
    return sorted(expected, key=lambda e: (order[e[1]], e[0]))


def stream(ds, batch_size, process_count=1):
    """All (x, y, mask) batches; checks their shapes and padding on the way."""
    batches = list(data.eval_batches(ds, batch_size, process_count=process_count))
    for x, y, mask in batches:
        assert x.shape == (batch_size, *ds.info.image_shape) and x.dtype == np.uint8
        assert y.shape == mask.shape == (batch_size,) and y.dtype == np.int32 and mask.dtype == bool
        assert (x[~mask] == 0).all() and (y[~mask] == 0).all()
        assert list(mask) == sorted(mask, reverse=True)   # real rows first
    return batches


def rows(batches):
    x = np.concatenate([b[0][b[2]] for b in batches])
    y = np.concatenate([b[1][b[2]] for b in batches])
    return x, y


@pytest.fixture
def wnid_folder(tmp_path):
    classes = [WNIDS[999], WNIDS[3], WNIDS[500], WNIDS[0]]
    expected = make_imagefolder(str(tmp_path / 'val'), classes)
    return str(tmp_path / 'val'), expected


def test_imagefolder_wnid_labels_and_pixels(wnid_folder):
    root, expected = wnid_folder
    ds = data.load_dataset(data_config('imagefolder', imagefolder_dir=root, image_size=64),
                           process_index=0, process_count=1)
    assert isinstance(ds, data.StreamingDataset)
    assert ds.info == data.imagenet_info('imagefolder', 64, 1000)
    assert ds.num_test_total == ds.num_test_local == len(expected) == 10
    batches = stream(ds, 4)
    assert len(batches) == 3 and [int(m.sum()) for _, _, m in batches] == [4, 4, 2]
    x, y = rows(batches)
    # Labels: the index among all 1000 ImageNet classes, not among the 4 folders.
    np.testing.assert_array_equal(y, [WNIDS.index(name) for _, name in expected])
    assert sorted(set(y.tolist())) == [0, 3, 500, 999]
    for got, (path, _) in zip(x, expected):
        want = Image.open(path).convert('RGB')
        w, h = want.size
        size = (73, int(73 * h / w)) if w <= h else (int(73 * w / h), 73)   # round(64 * 256 / 224) = 73
        want = want.resize(size, Image.BILINEAR)
        left, top = int(round((size[0] - 64) / 2.0)), int(round((size[1] - 64) / 2.0))
        np.testing.assert_array_equal(got, np.asarray(want.crop((left, top, left + 64, top + 64))))


def test_imagefolder_other_class_names(tmp_path):
    classes = ['zebra', 'cat', 'dog']
    expected = make_imagefolder(str(tmp_path), classes)
    ds = data.load_dataset(data_config('imagefolder', imagefolder_dir=str(tmp_path), image_size=32),
                           process_index=0, process_count=1)
    assert ds.info.num_classes == 3 and ds.info.image_shape == (32, 32, 3)
    _, y = rows(stream(ds, 5))
    np.testing.assert_array_equal(y, [['cat', 'dog', 'zebra'].index(name) for _, name in expected])

    # One folder that is not an ILSVRC2012 class: the names count as K classes of their own.
    mixed = tmp_path / 'mixed'
    make_imagefolder(str(mixed), [WNIDS[7], WNIDS[2], 'n99999999'], per_class=(1,))
    ds = data.load_dataset(data_config('imagefolder', imagefolder_dir=str(mixed), image_size=32),
                           process_index=0, process_count=1)
    assert ds.info.num_classes == 3
    np.testing.assert_array_equal(rows(stream(ds, 8))[1], [0, 1, 2])


@pytest.mark.parametrize('process_count', [2, 3])
def test_imagefolder_shares_make_up_the_whole(wnid_folder, process_count):
    root, expected = wnid_folder
    config = data_config('imagefolder', imagefolder_dir=root, image_size=32)
    whole_x, whole_y = rows(stream(data.load_dataset(config, process_index=0, process_count=1), 3))
    shares = [data.load_dataset(config, process_index=p, process_count=process_count)
              for p in range(process_count)]
    assert [s.num_test_local for s in shares] == [len(a) for a in np.array_split(np.arange(10), process_count)]
    # Small threads and prefetch: the decode-ahead queue turns over many times.
    shares = [dataclasses.replace(s, decode_threads=2, prefetch_batches=1) for s in shares]
    per_process = [stream(s, 2, process_count) for s in shares]
    # Every process: ceil(ceil(10 / P) / 2) batches, 5 -> 3 or 4 -> 2.
    assert [len(b) for b in per_process] == [{2: 3, 3: 2}[process_count]] * process_count
    x = np.concatenate([rows(b)[0] for b in per_process])
    y = np.concatenate([rows(b)[1] for b in per_process])
    np.testing.assert_array_equal(x, whole_x)
    np.testing.assert_array_equal(y, whole_y)
    assert all(s.num_test_total == 10 for s in shares)
    with pytest.raises(ValueError, match='another process count'):
        next(data.eval_batches(data.load_dataset(config, process_index=0, process_count=1), 2,
                               process_count=process_count))


def test_imagefolder_errors(tmp_path):
    def load(root, **fields):
        return data.load_dataset(data_config('imagefolder', imagefolder_dir=root, **fields),
                                 process_index=0, process_count=1)

    with pytest.raises(ValueError, match=r"data.name='imagefolder' needs data\.imagefolder_dir"):
        load(None)
    with pytest.raises(FileNotFoundError, match=r"data\.imagefolder_dir='.*nope': no such directory"):
        load(str(tmp_path / 'nope'))
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(ValueError, match=r'data\.imagefolder_dir=.*holds no class folders \(it is empty\)'):
        load(str(empty))
    loose = tmp_path / 'loose'
    write_image(str(loose / 'a.jpg'), (30, 30), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r'holds no class folders \(its 1 images lie directly in it\): put '):
        load(str(loose))
    no_images = tmp_path / 'no_images'
    make_imagefolder(str(no_images), ['a', 'b'])
    (no_images / 'c' / 'sub').mkdir(parents=True)
    (no_images / 'c' / 'readme.txt').write_text('x')
    with pytest.raises(ValueError, match=r'data\.imagefolder_dir=.*the class folder\(s\) c hold no image file'):
        load(str(no_images))
    for bad in (0, -3, 2.5, True, '224'):
        with pytest.raises(ValueError, match=rf'data\.image_size={bad!r} is not allowed: use a positive integer'):
            load(str(no_images), image_size=bad)

    broken = tmp_path / 'broken'
    make_imagefolder(str(broken), ['a', 'b'])
    (broken / 'b' / 'img9.jpg').write_bytes(b'\xff\xd8 truncated')
    ds = load(str(broken), image_size=32)
    with pytest.raises(ValueError, match=r"data\.imagefolder_dir=.*cannot read the image '.*img9\.jpg' "
                                         r'\(UnidentifiedImageError: .*\)\. Replace or delete the file'):
        stream(ds, 2)


def test_streaming_dataset_has_no_train_split(wnid_folder):
    ds = data.load_dataset(data_config('imagefolder', imagefolder_dir=wnid_folder[0]), process_index=0,
                           process_count=1)
    message = r"data.name='imagefolder' holds evaluation images only \(no train split\), so .* teacher\.checkpoint"
    with pytest.raises(data.NoTrainSplitError, match=message):
        data.require_train_split(ds)
    with pytest.raises(ValueError, match=message):
        ds.x_train
    with pytest.raises(ValueError, match=message):
        data.steps_per_epoch(ds, 2)
    with pytest.raises(ValueError, match=message):
        next(data.train_batches(ds, 2, seed=0, epoch=0, process_index=0, process_count=1))
    array = data.ArrayDataset(ds.info, np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int32),
                              np.zeros((1, 4, 4, 3), np.uint8), np.zeros(1, np.int32), 1)
    data.require_train_split(array)   # no error


def test_stream_checks_the_share_length():
    info = data.imagenet_info('imagefolder', 8, 2)
    item = (np.zeros((8, 8, 3), np.uint8), 1)
    short = data.StreamingDataset(info, num_test_total=3, num_test_local=3, test_items=lambda: [0, 1],
                                  load_item=lambda i: item)
    with pytest.raises(RuntimeError, match='should hold 3 test images, but reading it gave 2'):
        stream(short, 2)
    long = dataclasses.replace(short, test_items=lambda: range(9))
    with pytest.raises(RuntimeError, match='gave 4 and more'):   # 2 batches of 2, then one more
        stream(long, 2)


def test_evaluate_streams_through_the_eval_step(tmp_path):
    """evaluate.evaluate over a StreamingDataset = top-1/top-5 computed with numpy from the files."""
    classes = [f'c{k}' for k in range(6)]
    expected = make_imagefolder(str(tmp_path), classes, per_class=(2, 3))
    ds = data.load_dataset(data_config('imagefolder', imagefolder_dir=str(tmp_path), image_size=16),
                           process_index=0, process_count=1)
    weights = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
    apply_fn = lambda v, x: jnp.mean(x, axis=(1, 2)) @ v   # (B, 3) @ (3, 6)
    mesh = parallel.make_mesh()
    step = evaluate.make_eval_step(apply_fn, ds.info, mesh)
    result = evaluate.evaluate(step, parallel.replicate(weights, mesh), ds, mesh, 8)

    images = np.stack([data.read_image(p, 16) for p, _ in expected]).astype(np.float64) / 255.0
    logits = ((images - data.IMAGENET_MEAN) / data.IMAGENET_STD).mean(axis=(1, 2)) @ weights
    labels = np.array([classes.index(name) for _, name in expected])
    ranked = np.argsort(-logits, axis=1)
    assert result['images'] == len(expected) == 15
    assert result['top1'] == pytest.approx(100.0 * np.mean(ranked[:, 0] == labels))
    assert result['top5'] == pytest.approx(100.0 * np.mean((ranked[:, :5] == labels[:, None]).any(1)))


def test_evaluate_mode_on_an_imagefolder(tmp_path, wnid_folder):
    """run_evaluation scores a 1000-class checkpoint recorded at 32x32 on 24x24 crops of a folder
    that holds 4 of the classes. The output bias ranks 4 classes above all others, so top-1 is
    the share of the largest of them and top-5 is 100 %."""
    import jax
    from bag_jax.models import ResNetCifar
    model = ResNetCifar(num_classes=1000, depth=8)
    variables = jax.tree.map(np.asarray, jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    bias = np.zeros(1000, np.float32)
    bias[[500, 999, 3, 0]] = [1000.0, 900.0, 800.0, 700.0]   # folder sizes 4, 3, 2, 1 of 10 images
    variables['params']['output']['bias'] = bias
    directory = str(tmp_path / 'teacher')
    checkpoint.save_teacher(directory, variables, checkpoint.model_meta(
        data.imagenet_info('imagenet2012', 32), model, source='test'))
    config = ml_collections.ConfigDict({
        'mode': 'evaluate', 'checkpoint': directory, 'eval_batch_size': 8,
        'data': data_config('imagefolder', imagefolder_dir=wnid_folder[0], image_size=24)})
    summary = evaluate.run_evaluation(settings.parse(config), str(tmp_path / 'work'))
    assert summary['images'] == 10
    assert summary['top1'] == pytest.approx(40.0) and summary['top5'] == pytest.approx(100.0)


# ------------------------------------------------------------------------------------------------
# Config validation and checkpoint compatibility


def test_validate_data_fields():
    c = base.get_config()
    assert (c.data.image_size, c.data.imagefolder_dir) == (224, None)
    c.data.name = 'imagefolder'
    with pytest.raises(ValueError, match=r"data\.name='imagefolder' needs data\.imagefolder_dir"):
        settings.parse_data(c)
    c.data.imagefolder_dir = '/some/val'
    settings.parse_data(c)
    c.data.image_size = 0
    with pytest.raises(ValueError, match=r'data\.image_size=0 is not allowed: use an integer of at least 1'):
        settings.parse_data(c)
    c.data.image_size = 160
    c.data.imagefolder_dir = ''
    with pytest.raises(ValueError, match=r"data\.imagefolder_dir='' is not allowed"):
        settings.parse_data(c)
    c.data.imagefolder_dir = '/some/val'
    c.mode = 'teacher'
    with pytest.raises(ValueError, match=r"data\.name='imagefolder' holds evaluation images only"):
        settings.parse_data(c)
    c.data.name, c.mode = 'imagenet2012', 'evaluate'
    settings.parse_data(c)


def test_check_compatible_lets_imagenet_data_choose_the_size():
    zoo = data.imagenet_info('imagenet2012', 224)
    checkpoint.check_compatible(zoo, data.imagenet_info('imagefolder', 160), 'checkpoint')
    checkpoint.check_compatible(zoo, data.imagenet_info('imagenet2012', 288), 'checkpoint')
    with pytest.raises(ValueError, match=r"checkpoint was made for 'imagenet2012' \(1000 classes.*has 10 classes"):
        checkpoint.check_compatible(zoo, data.imagenet_info('imagefolder', 224, 10), 'checkpoint')
    gray = dataclasses.replace(data.imagenet_info('imagefolder', 224), image_shape=(224, 224, 1),
                               mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match='images'):
        checkpoint.check_compatible(zoo, gray, 'checkpoint')
    cifar = data.cifar_info('cifar100')
    with pytest.raises(ValueError, match=r'images \(16, 16, 3\)'):   # other sources: the same size
        checkpoint.check_compatible(cifar, dataclasses.replace(cifar, name='npz', image_shape=(16, 16, 3)),
                                    'teacher.checkpoint')


# ------------------------------------------------------------------------------------------------
# imagenet2012 (tfds)


def test_imagenet2012_not_prepared_fails_at_once(tmp_path):
    pytest.importorskip('tensorflow_datasets')
    no_network = mock.patch.object(socket.socket, 'connect', side_effect=AssertionError('network access'))
    with no_network, pytest.raises(data.DatasetUnavailableError) as error:
        data.load_dataset(data_config('imagenet2012', tfds_dir=str(tmp_path)), process_index=0, process_count=1)
    message = str(error.value)
    manual = os.path.join(str(tmp_path), 'downloads', 'manual')
    for part in (f'data.tfds_dir={str(tmp_path)!r} holds no prepared copy', 'ILSVRC2012_img_val.tar', manual,
                 "tfds.builder('imagenet2012', data_dir=", 'download_and_prepare()',
                 f'--config.data.tfds_dir={tmp_path}', '--config.data.name=imagefolder'):
        assert part in message, part
    assert os.listdir(tmp_path) == []   # nothing was downloaded or created
    with no_network, pytest.raises(data.DatasetUnavailableError, match=r"data\.tfds_dir='.*nope' does not exist"):
        data.load_dataset(data_config('imagenet2012', tfds_dir=str(tmp_path / 'nope')), process_index=0,
                          process_count=1)


NUM_FAKE_VAL = 7


@pytest.fixture(scope='module')
def prepared_imagenet(tmp_path_factory):
    """A tfds imagenet2012 prepared from a fake ILSVRC2012_img_val.tar of NUM_FAKE_VAL random
    JPEGs, in both file formats. Returns ({format: tfds_dir}, [(jpeg bytes, label)])."""
    pytest.importorskip('tensorflow')
    _, tfds = data.tfds_cifar.import_tfds()
    rng = np.random.default_rng(5)
    archive = io.BytesIO()
    files = []
    with tarfile.open(fileobj=archive, mode='w') as tar:
        for i in range(NUM_FAKE_VAL):
            buffer = io.BytesIO()
            w, h = rng.integers(20, 70, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(buffer, 'JPEG')
            encoded = buffer.getvalue()
            member = tarfile.TarInfo(f'ILSVRC2012_val_{i + 1:08d}.JPEG')
            member.size = len(encoded)
            tar.addfile(member, io.BytesIO(encoded))
            files.append(encoded)
    # tfds labels the validation images by the sorted file names, from its validation_labels.txt.
    with open(os.path.join(os.path.dirname(tfds.__file__), 'datasets', 'imagenet2012', 'validation_labels.txt')) as f:
        wnids = f.read().split()[:NUM_FAKE_VAL]
    expected = [(encoded, WNIDS.index(wnid)) for encoded, wnid in zip(files, wnids)]
    dirs = {}
    for file_format in ('tfrecord', 'array_record'):
        root = str(tmp_path_factory.mktemp(f'tfds_{file_format}'))
        manual = os.path.join(root, 'downloads', 'manual')
        os.makedirs(manual)
        with open(os.path.join(manual, 'ILSVRC2012_img_val.tar'), 'wb') as f:
            f.write(archive.getvalue())
        tfds.builder('imagenet2012', data_dir=root, file_format=file_format).download_and_prepare()
        dirs[file_format] = root
    return dirs, expected


@pytest.mark.parametrize('file_format', ['tfrecord', 'array_record'])
def test_imagenet2012_reads_the_validation_split(prepared_imagenet, file_format):
    dirs, expected = prepared_imagenet
    config = data_config('imagenet2012', tfds_dir=dirs[file_format], image_size=48)
    ds = data.load_dataset(config, process_index=0, process_count=1)
    assert isinstance(ds, data.StreamingDataset)
    assert ds.info == data.imagenet_info('imagenet2012', 48, 1000)
    assert ds.num_test_total == ds.num_test_local == NUM_FAKE_VAL
    x, y = rows(stream(ds, 3))
    # tfds stores the examples in its own (hashed) order: match each to its file by its pixels.
    want = {data.read_image(encoded, 48).tobytes(): label for encoded, label in expected}
    assert len(want) == NUM_FAKE_VAL
    assert sorted(want.values()) == sorted(y.tolist())
    for image, label in zip(x, y):
        assert want[image.tobytes()] == label

    shares = [data.load_dataset(config, process_index=p, process_count=3) for p in range(3)]
    assert [s.num_test_local for s in shares] == [3, 2, 2]
    per_process = [stream(s, 2, 3) for s in shares]
    assert [len(b) for b in per_process] == [2, 2, 2]
    np.testing.assert_array_equal(np.concatenate([rows(b)[0] for b in per_process]), x)
    np.testing.assert_array_equal(np.concatenate([rows(b)[1] for b in per_process]), y)
    with pytest.raises(ValueError, match="data.name='imagenet2012' holds evaluation images only"):
        data.require_train_split(ds)

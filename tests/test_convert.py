"""bag_jax.convert against real PyTorch/pytorchcv outputs (tests/fixtures/, made by
tests/make_pytorchcv_fixture.py; these tests need no PyTorch).

Parity tolerance: rtol = atol = 1e-4 on logits of magnitude up to ~15. Measured when the
fixture was made: max |JAX - pytorchcv float32| = 4.8e-6 (resnet20_cifar100), 3.6e-7
(resnet8_cifar10); pytorchcv's own float32 vs float64 gap is 3.8e-6.
"""

import os
import pickle
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from bag_jax import checkpoint, convert
from bag_jax.models import ResNetCifar

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = ATOL = 1e-4
NOT_STATE = ('images', 'logits', 'logits_float64')


def fixture(name):
    return os.path.join(FIXTURES, name)


@pytest.fixture(scope='module')
def resnet20():
    """(state dict, images NHWC, pytorchcv eval logits) of the resnet20_cifar100 fixture."""
    with np.load(fixture('resnet20_cifar100.npz')) as f:
        arrays = {k: f[k] for k in f.files}
    state_dict = {k: v for k, v in arrays.items() if k not in NOT_STATE}
    return state_dict, arrays['images'], arrays['logits']


@pytest.fixture(scope='module')
def resnet20_converted(resnet20):
    return convert.variables_from_state_dict(resnet20[0])


def resnet8_logits():
    with np.load(fixture('resnet8_cifar10.npz')) as f:
        return f['logits']


# ------------------------------------------------------------------------------------------
# read_pth on real torch.save files


def expected_tensors():
    with np.load(fixture('tensors.npz')) as f:
        arrays = {k: f[k] for k in f.files}
    dtypes = dict(entry.split('=') for entry in arrays.pop('dtypes'))
    return arrays, dtypes


@pytest.mark.parametrize('name', ['tensors_legacy.pth', 'tensors_zip.pth', 'tensors_zip.pth.zip'])
def test_read_pth_matches_torch(name):
    expected, dtypes = expected_tensors()
    state_dict = convert.read_pth(fixture(name))
    assert list(state_dict) == list(dtypes)  # the file's order
    for key, value in state_dict.items():
        assert isinstance(value, np.ndarray), key
        assert value.dtype.name == dtypes[key], key
        assert value.shape == expected[key].shape, key
        assert value.flags.c_contiguous and value.flags.owndata, key
        np.testing.assert_array_equal(value.astype(expected[key].dtype), expected[key], err_msg=key)
    # The views came out as their own arrays with torch's values, not the whole storage.
    np.testing.assert_array_equal(state_dict['shared.offset_view'].ravel(), state_dict['shared.base'][5:11])
    np.testing.assert_array_equal(state_dict['shared.strided_view'], state_dict['shared.base'][1::4])
    assert state_dict['index'].max() > 2 ** 32


def test_read_pth_zoo_legacy_pth_zip_is_a_full_state_dict():
    state_dict = convert.read_pth(fixture('resnet8_cifar10.pth.zip'))
    assert len(state_dict) == 56  # 8 BN x 6 entries + 7 conv weights + output weight and bias
    assert state_dict['features.init_block.conv.weight'].shape == (16, 3, 3, 3)
    assert state_dict['features.init_block.bn.num_batches_tracked'].dtype == np.int64
    assert state_dict['output.weight'].shape == (10, 64)


# ------------------------------------------------------------------------------------------
# pytorchcv parity


def test_resnet20_cifar100_logits_match_pytorchcv(resnet20, resnet20_converted):
    _, images, torch_logits = resnet20
    model, variables = resnet20_converted
    assert (model.depth, model.num_classes) == (20, 100)
    logits = np.asarray(model.apply(variables, images, train=False))
    assert logits.shape == (4, 100) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, torch_logits, rtol=RTOL, atol=ATOL)


def test_resnet20_cifar100_parameter_count(resnet20_converted):
    _, variables = resnet20_converted
    assert sum(x.size for x in jax.tree.leaves(variables['params'])) == 278_324  # pytorchcv's count
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(variables))


def test_layouts(resnet20, resnet20_converted):
    state_dict = resnet20[0]
    _, variables = resnet20_converted
    params, stats = variables['params'], variables['batch_stats']
    w = state_dict['features.stage3.unit1.identity_conv.conv.weight']  # (out 64, in 32, 1, 1)
    np.testing.assert_array_equal(params['stage3_unit1']['identity_conv']['conv']['kernel'][0, 0], w[:, :, 0, 0].T)
    w = state_dict['features.stage2.unit3.body.conv2.conv.weight']
    assert params['stage2_unit3']['conv2']['conv']['kernel'][1, 2, 5, 7] == w[7, 5, 1, 2]
    np.testing.assert_array_equal(params['output']['kernel'], state_dict['output.weight'].T)
    np.testing.assert_array_equal(params['stage1_unit2']['conv1']['bn']['scale'],
                                  state_dict['features.stage1.unit2.body.conv1.bn.weight'])
    np.testing.assert_array_equal(stats['init_block']['bn']['var'], state_dict['features.init_block.bn.running_var'])


def test_depth_and_classes_are_inferred_from_a_zoo_style_file():
    model, variables = convert.load_pytorchcv(fixture('resnet8_cifar10.pth.zip'))
    assert (model.depth, model.num_classes) == (8, 10)
    with np.load(fixture('resnet20_cifar100.npz')) as f:
        images = f['images']
    np.testing.assert_allclose(np.asarray(model.apply(variables, images, train=False)), resnet8_logits(),
                               rtol=RTOL, atol=ATOL)


def test_num_batches_tracked_is_optional(resnet20):
    state_dict = {k: v for k, v in resnet20[0].items() if not k.endswith('num_batches_tracked')}
    model, _ = convert.variables_from_state_dict(state_dict)
    assert model.depth == 20


# ------------------------------------------------------------------------------------------
# Command line


def test_cli_writes_a_teacher_checkpoint(tmp_path, capsys):
    source = tmp_path / 'resnet8_cifar10-0000-deadbeef.pth.zip'  # a zoo-style name: cifar10 inferred
    shutil.copy(fixture('resnet8_cifar10.pth.zip'), source)
    out = tmp_path / 'teacher'
    assert convert.main(['--pytorchcv', str(source), '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and 'cifar10' in printed and 'depth 8' in printed

    model, variables, meta = checkpoint.load_teacher(str(out))
    assert (model.depth, model.num_classes) == (8, 10)
    assert meta == {
        'kind': 'teacher', 'arch': 'resnet_cifar', 'depth': 8, 'num_classes': 10, 'source': source.name,
        'data': {'name': 'cifar10', 'num_classes': 10, 'image_shape': [32, 32, 3],
                 'mean': [0.49139968, 0.48215827, 0.44653124], 'std': [0.24703233, 0.24348505, 0.26158768],
                 'augment': 'crop_flip'},
    }
    with np.load(fixture('resnet20_cifar100.npz')) as f:
        images = f['images']
    direct_model, direct_variables = convert.load_pytorchcv(str(source))
    reloaded = np.asarray(model.apply(variables, images, train=False))
    np.testing.assert_array_equal(reloaded, np.asarray(direct_model.apply(direct_variables, images, train=False)))
    np.testing.assert_allclose(reloaded, resnet8_logits(), rtol=RTOL, atol=ATOL)


def test_cli_dataset_flag_and_its_errors(tmp_path, capsys):
    source = tmp_path / 'teacher_weights.pth'  # the name does not say the dataset
    with open(fixture('resnet8_cifar10.pth.zip'), 'rb') as f:
        source.write_bytes(f.read())
    assert convert.main(['--pytorchcv', str(source), '--out', str(tmp_path / 'a')]) == 1
    assert '--dataset' in capsys.readouterr().err
    assert convert.main(['--pytorchcv', str(source), '--out', str(tmp_path / 'b'), '--dataset', 'cifar100']) == 1
    assert '10 outputs' in capsys.readouterr().err
    assert convert.main(['--pytorchcv', str(source), '--out', str(tmp_path / 'c'), '--dataset', 'cifar10']) == 0
    assert checkpoint.load_teacher(str(tmp_path / 'c'))[2]['data']['name'] == 'cifar10'
    assert convert.main(['--pytorchcv', str(source), '--out', str(tmp_path / 'c'), '--dataset', 'cifar10']) == 1
    assert 'already holds' in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: invalid choice
        convert.main(['--pytorchcv', str(source), '--out', str(tmp_path / 'd'), '--dataset', 'imagenet'])
    assert 'imagenet' in capsys.readouterr().err


def test_cli_missing_file_is_one_clear_line(tmp_path):
    result = subprocess.run(
        [sys.executable, '-m', 'bag_jax.convert', '--pytorchcv', str(tmp_path / 'resnet20_cifar100.pth'),
         '--out', str(tmp_path / 'out')], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert 'does not exist' in result.stderr and 'resnet20_cifar100.pth' in result.stderr
    assert 'Traceback' not in result.stderr
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('name, dataset', [
    ('resnet20_cifar100-2964-a5322afe.pth.zip', 'cifar100'),
    ('/some/dir/resnet56_cifar10-0452-628c42a2.pth', 'cifar10'),
    ('resnet20_cifar10.pth', 'cifar10'),
    ('resnet20_svhn-0323-aa8f1b3c.pth', None),
    ('net_cifar1000.pth', None),
])
def test_infer_dataset(name, dataset):
    assert convert.infer_dataset(name) == dataset


def test_dataset_info_cifar100_and_unknown_dataset():
    for dataset, path in ((None, 'resnet20_cifar100-2964-a5322afe.pth'), ('cifar100', 'x.pth')):
        info = convert.dataset_info(ResNetCifar(num_classes=100, depth=20), dataset, path)
        assert list(info.mean) == [0.50705882, 0.48666667, 0.44078431]
        assert list(info.std) == [0.26745098, 0.25568627, 0.27607843]
    with pytest.raises(ValueError, match="dataset='svhn'.*cifar10"):
        convert.dataset_info(ResNetCifar(num_classes=10, depth=20), 'svhn', 'x.pth')


# ------------------------------------------------------------------------------------------
# Bad inputs


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='nothing.pth'):
        convert.read_pth(str(tmp_path / 'nothing.pth'))


@pytest.mark.parametrize('content', [b'', b'hello, this is text\n', bytes(range(256)) * 4,
                                     pickle.dumps({'a': 1}), b'PK\x03\x04 not really a zip'])
def test_not_a_pth(tmp_path, content):
    path = tmp_path / 'weights.pth'
    path.write_bytes(content)
    with pytest.raises(ValueError, match='weights.pth.*(PyTorch state dict|state dict)'):
        convert.read_pth(str(path))


def test_other_zip_archives_are_refused():
    with pytest.raises(ValueError, match='zip archive holding .*images.npy.*PyTorch state dict'):
        convert.read_pth(fixture('resnet20_cifar100.npz'))


def test_truncated_files(tmp_path):
    for name in ('tensors_legacy.pth', 'tensors_zip.pth'):
        with open(fixture(name), 'rb') as f:
            data = f.read()
        path = tmp_path / name
        path.write_bytes(data[:len(data) - 100])
        with pytest.raises(ValueError, match=name):
            convert.read_pth(str(path))


def test_a_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / 'created_by_unpickling'

    class Evil:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    path = tmp_path / 'evil.pth'
    path.write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(ValueError, match='evil.pth'):
        convert.read_pth(str(path))
    assert not marker.exists()


def test_training_checkpoint_and_whole_model_are_refused():
    with pytest.raises(ValueError, match="training checkpoint.*'state_dict'"):
        convert.read_pth(fixture('training_checkpoint.pth'))
    with pytest.raises(ValueError, match='Linear.*not a state dict.*state_dict\\(\\)'):
        convert.read_pth(fixture('whole_model.pth'))


def test_missing_unexpected_and_misshapen_entries(resnet20):
    state_dict = dict(resnet20[0])
    del state_dict['features.stage2.unit1.identity_conv.bn.running_var']
    state_dict['features.stage1.unit2.body.conv1.conv.weight'] = np.zeros((16, 16, 5, 5), np.float32)
    state_dict['features.stage4.unit1.body.conv1.conv.weight'] = np.zeros((8, 64, 3, 3), np.float32)
    with pytest.raises(ValueError) as error:
        convert.variables_from_state_dict(state_dict)
    message = str(error.value)
    assert "missing 'features.stage2.unit1.identity_conv.bn.running_var'" in message
    assert "'features.stage1.unit2.body.conv1.conv.weight' has shape (16, 16, 5, 5)" in message
    assert '(3, 3, 16, 16)' in message
    assert "unexpected 'features.stage4.unit1.body.conv1.conv.weight'" in message


def test_not_a_cifar_resnet_state_dict():
    with pytest.raises(ValueError, match="'output.weight'"):
        convert.variables_from_state_dict({'conv.weight': np.zeros((4, 3, 3, 3), np.float32)})
    with pytest.raises(ValueError, match="shape \\(100,\\)"):
        convert.variables_from_state_dict({'features.init_block.conv.weight': np.zeros((16, 3, 3, 3), np.float32),
                                           'output.weight': np.zeros((100,), np.float32)})

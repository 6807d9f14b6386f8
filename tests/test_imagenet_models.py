"""pytorchcv's ImageNet ResNet-18/50 and MobileNetV2 (bag_jax.models.resnet_imagenet, mobilenet_v2)
and their import (bag_jax.convert) against pytorchcv outputs.

The fixtures (tests/fixtures/imagenet/, README there) are reduced-width networks with random
weights and randomized BatchNorms, and pytorchcv's logits on one (2, 3, 224, 224) batch: in eval
mode, with train-mode BN, both in float32 and float64, and the BNS loss. Tolerances are the
README's: float32 eval max|d| <= 1e-4 max|ref| (the eval logits reach 1.3e4), train-BN atol 1e-4
(O(1) logits), BNS loss relative 1e-4; float64 relative 1e-9, the check that sees a swapped BN
statistic. Measured when written: float32 eval <= 4.3e-6 relative, train-BN <= 1.6e-5, BNS loss
<= 2.6e-6 relative; float64 <= 1e-13 relative.

The full-size architectures are checked through `jax.eval_shape` only: parameter counts
(pytorchcv's), BatchNorms, QuantActs and weight-quantized layers (docs/imagenet.md 1, 4).
"""

import json
import os
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bag_jax import checkpoint, convert, losses, quant
from bag_jax.models import MobileNetV2, ResNet, bn_input_pairs, registry, unit_features
from bag_jax.quant import QuantSpec
from tests.quant_reference import quantize_kernels_numpy

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'imagenet')
NAMES = ('resnet18_wd4', 'resnet50_wd8', 'mobilenetv2_w1_wd4')

RESNET18 = ResNet(num_classes=1000, channels=((64, 64), (128, 128), (256, 256), (512, 512)))
RESNET50 = ResNet(num_classes=1000, channels=((256,) * 3, (512,) * 4, (1024,) * 6, (2048,) * 3), bottleneck=True)
MOBILENETV2 = MobileNetV2(num_classes=1000, channels=((16,), (24, 24), (32, 32, 32), (64, 64, 64, 64, 96, 96, 96),
                                                      (160, 160, 160, 320)))
# name: (model, parameters, BatchNorms, QuantActs, weight-quantized layers, residual units) (docs/imagenet.md 1, 4)
FULL = {
    'resnet18': (RESNET18, 11_689_512, 20, 17, 21, 8),
    'resnet50': (RESNET50, 25_557_032, 53, 49, 54, 16),
    'mobilenetv2_w1': (MOBILENETV2, 3_504_960, 53, 36, 54, 17),
}
# The fixtures' pytorchcv names and their full architectures.
FIXTURE_ARCH = {'resnet18_wd4': ('resnet18_wd4', 'resnet18'), 'resnet50_wd8': ('resnet50_wd8', 'resnet50'),
                'mobilenetv2_w1_wd4': ('mobilenetv2_wd4', 'mobilenetv2_w1')}


def count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


def relative_error(value, reference):
    return float(np.max(np.abs(np.asarray(value, np.float64) - reference)) / np.max(np.abs(reference)))


def load_fixture(name):
    with np.load(os.path.join(FIXTURES, f'{name}_fixture.npz')) as f:
        arrays = {k: f[k] for k in f.files}
    arrays['meta'] = json.loads(str(arrays.pop('_meta_json')))
    return arrays


@pytest.fixture(scope='module', params=NAMES)
def converted(request):
    """(name, model, variables, fixture arrays, pytorchcv-side results of one jitted float32 pass):
    eval logits with the sown BN inputs and unit features, and train-mode-BN logits."""
    name = request.param
    model, variables = convert.load_pytorchcv(os.path.join(FIXTURES, f'{name}.pth'))
    arrays = load_fixture(name)
    images = jnp.asarray(arrays['_input'].transpose(0, 2, 3, 1))   # NCHW -> NHWC

    @jax.jit
    def forward(variables, images):
        logits, sown = model.apply(variables, images, mutable=['bn_inputs', 'features'])
        bns = losses.bns_loss(bn_input_pairs(sown['bn_inputs'], variables['batch_stats']))
        train_logits, _ = model.apply(variables, images, train=True, mutable=['batch_stats'])
        return logits, train_logits, bns, jax.tree.map(lambda a: a.shape, sown['bn_inputs']), sown['features']

    logits, train_logits, bns, bn_input_shapes, features = forward(variables, images)
    return name, model, variables, arrays, dict(logits=np.asarray(logits), train_logits=np.asarray(train_logits),
                                                bns=float(bns), bn_input_shapes=bn_input_shapes, features=features)


# ------------------------------------------------------------------------------------------
# Parity with pytorchcv


def test_float32_logits_and_bns_loss_match_pytorchcv(converted):
    name, model, variables, arrays, out = converted
    assert convert.pytorchcv_name(model) == FIXTURE_ARCH[name][0]
    assert count(variables['params']) == arrays['meta']['num_params']
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(variables))
    assert out['logits'].shape == (2, 1000) and out['logits'].dtype == np.float32
    assert relative_error(out['logits'], arrays['_logits_eval']) <= 1e-4
    np.testing.assert_allclose(out['train_logits'], arrays['_logits_trainbn'], rtol=0, atol=1e-4)
    assert abs(out['bns'] - float(arrays['_bns_loss'])) <= 1e-4 * float(arrays['_bns_loss'])


def test_float64_logits_match_pytorchcv(converted):
    """Eval mode in float32 barely sees a wrong BN statistic (README); float64 does."""
    name, model, variables, arrays, _ = converted
    with jax.enable_x64(True):   # a context: nothing leaks into other tests
        v64 = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
        images = np.ascontiguousarray(arrays['_input'].astype(np.float64).transpose(0, 2, 3, 1))
        both = jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, train=True, mutable=['batch_stats'])[0]))
        logits, train_logits = jax.device_get(both(v64, images))
    assert logits.dtype == np.float64
    assert relative_error(logits, arrays['_logits_eval_f64']) <= 1e-9
    assert relative_error(train_logits, arrays['_logits_trainbn_f64']) <= 1e-9
    assert jnp.zeros(1).dtype == jnp.float32


def test_bn_inputs_and_unit_features_follow_the_conventions(converted):
    name, model, variables, arrays, out = converted
    _, _, bns, _, _, units = FULL[FIXTURE_ARCH[name][1]]
    shapes = flax.traverse_util.flatten_dict(out['bn_input_shapes'])
    assert len(shapes) == bns == arrays['meta']['num_batchnorm']
    stats = flax.traverse_util.flatten_dict(variables['batch_stats'])
    for path, shape in shapes.items():   # every BN input sits next to its BN `bn`
        assert path[-1] == 'input' and shape[0] == 2
        assert stats[path[:-1] + ('bn', 'mean')].shape == (shape[-1],)
    features = out['features']
    assert sorted(features) == sorted(f'stage{s}_unit{u}' for s, stage in enumerate(model.channels, 1)
                                      for u in range(1, len(stage) + 1))
    branches, outs = unit_features(features, 'branch'), unit_features(features, 'out')
    assert len(branches) == len(outs) == units
    widths = [w for stage in model.channels for w in stage]
    assert [b.shape[-1] for b in branches] == [o.shape[-1] for o in outs] == widths
    assert outs[-1].shape[1:3] == (7, 7)
    if isinstance(model, ResNet):
        assert all(float(jnp.min(o)) >= 0 for o in outs)          # after the unit's ReLU
    else:   # MobileNetV2: the output is the branch, plus the unit's input where widths and size agree
        previous = None
        for branch, unit_out in zip(branches, outs):
            if previous is not None and previous.shape == unit_out.shape:
                np.testing.assert_allclose(unit_out, branch + previous, rtol=1e-6, atol=1e-5)
            else:
                np.testing.assert_array_equal(unit_out, branch)
            previous = unit_out


# ------------------------------------------------------------------------------------------
# The full architectures (shapes only)


@pytest.mark.parametrize('arch', list(FULL))
def test_full_architecture_counts(arch, monkeypatch):
    model, params, bns, quant_acts, quantized_layers, _ = FULL[arch]
    student = registry.quantized(model, QuantSpec(4, 4))
    calls = []
    real = quant.quantize_weight

    def counting(w, bits, ste='identity'):
        calls.append((w.shape, bits))
        return real(w, bits, ste)
    monkeypatch.setattr(quant, 'quantize_weight', counting)
    shapes = jax.eval_shape(lambda: student.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
    logits = jax.eval_shape(lambda v: student.apply(v, jnp.zeros((3, 224, 224, 3))), shapes)
    assert logits.shape == (3, 1000)
    assert count(shapes['params']) == params
    assert len(jax.tree.leaves(shapes['batch_stats'])) == 2 * bns
    assert len(shapes['quant_stats']) > 0 and len(jax.tree.leaves(shapes['quant_stats'])) == 3 * quant_acts
    kernels = [p for p in flax.traverse_util.flatten_dict(shapes['params']) if p[-1] == 'kernel']
    per_trace = calls[:len(calls) // 2]   # init, then apply
    assert len(calls) == 2 * quantized_layers and len(kernels) == quantized_layers
    assert all(bits == 4 for _, bits in calls)
    if arch == 'mobilenetv2_w1':   # the 17 depthwise 3x3s are quantized too: 9 weights per channel
        assert sum(shape[:3] == (3, 3, 1) for shape, _ in per_trace) == 17
    # The teacher's tree is the student's without the activation ranges.
    teacher = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
    assert set(teacher) == {'params', 'batch_stats'}
    assert jax.tree.structure(teacher['params']) == jax.tree.structure(shapes['params'])
    assert convert.pytorchcv_name(model) == arch


@pytest.mark.parametrize('arch', list(FULL))
def test_registry_round_trip(arch):
    model = FULL[arch][0]
    description = registry.describe(model)
    assert description['arch'] == ('mobilenetv2' if arch.startswith('mobilenet') else 'resnet')
    assert registry.build(json.loads(json.dumps(description))) == model
    student = registry.quantized(model, QuantSpec(3, 4))
    assert (student.quant.w_bits, student.quant.a_bits) == (3, 4) and registry.describe(student) == description


@pytest.mark.parametrize('bad', [(), ((64,), ()), ((64, 0),), ((64, 64.0),)])
def test_bad_channels(bad):
    with pytest.raises(ValueError, match='ResNet.channels'):
        jax.eval_shape(lambda: ResNet(10, channels=bad).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))


# ------------------------------------------------------------------------------------------
# The quantized student


def test_mobilenetv2_student_quantizes_every_conv_per_output_channel():
    """Depthwise kernels (3, 3, 1, C) and the 1x1 classifier (1, 1, 1280, classes) included: the
    student equals the teacher run on numpy-quantized kernels."""
    teacher, variables = convert.load_pytorchcv(os.path.join(FIXTURES, 'mobilenetv2_w1_wd4.pth'))
    student = registry.quantized(teacher, QuantSpec(3, None))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    run_teacher, run_student = jax.jit(teacher.apply), jax.jit(student.apply)
    expected = run_teacher({'params': quantize_kernels_numpy(variables['params'], 3),
                            'batch_stats': variables['batch_stats']}, x)
    got = run_student(variables, x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(expected))))
    assert not np.allclose(got, run_teacher(variables, x), atol=1e-2)


@pytest.mark.parametrize('name', ['resnet18_wd4', 'mobilenetv2_w1_wd4'])
def test_student_calibrates_and_runs(name):
    teacher, variables = convert.load_pytorchcv(os.path.join(FIXTURES, f'{name}.pth'))
    student = registry.quantized(teacher, QuantSpec(4, 4))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 64, 64, 3))

    @jax.jit
    def run(variables, x):   # the ranges start at their init values (0, 0, beta_t 1)
        _, new = student.apply(variables, x, calibrate=True, mutable=['quant_stats'])
        return (new['quant_stats'], student.apply({**variables, **new}, x, mutable=['features']),
                teacher.apply(variables, x))

    stats, (logits, sown), teacher_logits = run(variables, x)
    assert logits.shape == (4, 1000) and bool(jnp.all(jnp.isfinite(logits)))
    assert not np.allclose(logits, teacher_logits, rtol=1e-2, atol=1e-2)
    betas = [v for path, v in flax.traverse_util.flatten_dict(stats).items() if path[-1] == 'beta_t']
    assert len(betas) == FULL['resnet18' if name.startswith('resnet') else 'mobilenetv2_w1'][3]
    assert all(float(b) == pytest.approx(0.9) for b in betas)   # every range calibrated once
    outs = unit_features(sown['features'], 'out')
    if name.startswith('resnet'):   # a QuantAct ends every ResNet unit
        assert all(len(np.unique(np.asarray(o))) <= 16 for o in outs)
    else:                           # MobileNetV2's residual stream stays full precision
        assert all(len(np.unique(np.asarray(o))) > 16 for o in outs)


# ------------------------------------------------------------------------------------------
# Conversion: layouts, errors, the command line


def test_layouts_of_depthwise_and_classifier_kernels():
    state_dict = convert.read_pth(os.path.join(FIXTURES, 'mobilenetv2_w1_wd4.pth'))
    model, variables = convert.variables_from_state_dict(state_dict)
    assert (model.init_channels, model.final_channels) == (8, 1280)
    params = variables['params']
    w = state_dict['features.stage2.unit1.conv2.conv.weight']     # (C, 1, 3, 3)
    np.testing.assert_array_equal(params['stage2_unit1']['conv2']['conv']['kernel'][:, :, 0, :],
                                  w[:, 0].transpose(1, 2, 0))
    np.testing.assert_array_equal(params['output']['kernel'][0, 0], state_dict['output.weight'][:, :, 0, 0].T)
    np.testing.assert_array_equal(variables['batch_stats']['final_block']['bn']['var'],
                                  state_dict['features.final_block.bn.running_var'])
    state_dict = convert.read_pth(os.path.join(FIXTURES, 'resnet50_wd8.pth'))
    model, variables = convert.variables_from_state_dict(state_dict)
    assert (model.bottleneck, model.init_channels) == (True, 8)
    np.testing.assert_array_equal(variables['params']['init_block']['conv']['conv']['kernel'][3, 4, 2, 5],
                                  state_dict['features.init_block.conv.conv.weight'][5, 2, 3, 4])
    np.testing.assert_array_equal(variables['params']['stage1_unit1']['identity_conv']['bn']['bias'],
                                  state_dict['features.stage1.unit1.identity_conv.bn.bias'])


def test_mismatched_imagenet_state_dicts_list_every_problem():
    state_dict = convert.read_pth(os.path.join(FIXTURES, 'resnet18_wd4.pth'))
    del state_dict['features.stage3.unit1.identity_conv.bn.running_mean']
    state_dict['features.init_block.conv.conv.weight'] = np.zeros((16, 3, 3, 3), np.float32)
    state_dict['features.stage1.unit1.body.conv3.bn.weight'] = np.zeros((16,), np.float32)
    with pytest.raises(ValueError) as error:
        convert.variables_from_state_dict(state_dict)
    message = str(error.value)
    assert 'resnet18_wd4' in message
    assert "missing 'features.stage3.unit1.identity_conv.bn.running_mean'" in message
    assert "'features.init_block.conv.conv.weight' has shape (16, 3, 3, 3)" in message and '(7, 7, 3, 16)' in message
    assert "unexpected 'features.stage1.unit1.body.conv3.bn.weight'" in message
    state_dict = convert.read_pth(os.path.join(FIXTURES, 'mobilenetv2_w1_wd4.pth'))
    del state_dict['features.stage2.unit2.conv3.conv.weight']
    with pytest.raises(ValueError, match="lacks 'features.stage2.unit2.conv3.conv.weight'"):
        convert.variables_from_state_dict(state_dict)
    state_dict = convert.read_pth(os.path.join(FIXTURES, 'mobilenetv2_w1_wd4.pth'))
    state_dict['output.weight'] = state_dict['output.weight'][:, :, 0, 0]
    expected = r"'output.weight' has shape \(1000, 1280\), expected \(num_classes, C, 1, 1\)"
    with pytest.raises(ValueError, match=expected):
        convert.variables_from_state_dict(state_dict)


def test_cli_converts_an_imagenet_network(tmp_path, capsys):
    source = tmp_path / 'resnet50_wd8.pth'
    shutil.copy(os.path.join(FIXTURES, 'resnet50_wd8.pth'), source)
    out = tmp_path / 'teacher'
    assert convert.main(['--pytorchcv', str(source), '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and 'resnet50_wd8' in printed and 'bottleneck' in printed and 'imagenet2012' in printed
    model, variables, meta = checkpoint.load_teacher(str(out))
    direct_model, direct_variables = convert.load_pytorchcv(str(source))
    assert model == direct_model
    jax.tree.map(np.testing.assert_array_equal, variables, direct_variables)
    assert meta['arch'] == 'resnet' and meta['bottleneck'] is True and meta['init_channels'] == 8
    assert meta['channels'] == [[32] * 3, [64] * 4, [128] * 6, [256] * 3]
    assert meta['data'] == {'name': 'imagenet2012', 'num_classes': 1000, 'image_shape': [224, 224, 3],
                            'mean': [0.485, 0.456, 0.406], 'std': [0.229, 0.224, 0.225], 'augment': 'none'}
    assert (meta['source'], meta['kind'], meta['num_classes']) == ('resnet50_wd8.pth', 'teacher', 1000)
    # An ImageNet network is not CIFAR data.
    assert convert.main(['--pytorchcv', str(source), '--out', str(tmp_path / 'b'), '--dataset', 'cifar10']) == 1
    assert 'ImageNet network' in capsys.readouterr().err
    assert not (tmp_path / 'b').exists()

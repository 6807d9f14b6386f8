"""The ONNX export (bag_jax.onnx_model, `bag_jax.export --format=onnx|all`): onnx.checker,
onnxruntime's integer operators after its graph optimization, counted against the layers whose
input the student quantizes, and agreement with the fake-quantized student on the digits test
set and, for a reduced-width student of each ImageNet architecture, on random images."""

import datetime
import json
import os
import sys

import jax
import numpy as np
import onnx
import pytest

from bag_jax import checkpoint, cli, data, export, integer_inference, onnx_model, quant
from tests.students import fixture_student, ptq_student

FIXTURES = ('resnet18_wd4', 'resnet50_wd8', 'mobilenetv2_w1_wd4')


def float_conv_count(operators):
    """Convolutions that onnxruntime runs in float after its optimization (Conv, FusedConv, NCHWc Conv)."""
    return sum(n for op, n in operators.items() if 'Conv' in op and op not in onnx_model.INTEGER_OPERATORS)


def integer_count(operators):
    return sum(operators.get(op, 0) for op in onnx_model.INTEGER_OPERATORS)


def kernels(variables):
    """Every weight-quantized layer of a student (its conv and dense kernels)."""
    paths = jax.tree_util.tree_flatten_with_path(variables['params'])[0]
    return [path for path, _ in paths if path[-1].key == 'kernel']


def save_student(tmp_path, name, variables, meta):
    directory = str(tmp_path / name)
    checkpoint.save_model(directory, variables, {k: v for k, v in meta.items() if k != 'kind'}, 'student')
    return directory


def test_activation_grid_is_the_quantizers_grid_after_relu_and_relu6():
    """The uint8 form (QuantizeLinear: round(x / scale) saturated to 0..255, then the Clip) gives
    q + zero_point of `quant.quantize_to_grid` applied to ReLU(x) or ReLU6(x)."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, 20000).astype(np.float32)
    for bits, lo, hi in ((3, 0.0, 2.7), (4, 0.0, 7.5), (8, 0.0, 5.3), (4, 0.31, 4.0), (2, 0.0, 1.0)):
        for activation, f in (('relu', lambda v: np.maximum(v, 0)), ('relu6', lambda v: np.clip(v, 0, 6))):
            scale, low, high = onnx_model.activation_grid(lo, hi, bits, activation)
            q, zero_point, _ = quant.quantize_to_grid(f(x), np.float32(lo), np.float32(hi), bits)
            expected = np.asarray(q + zero_point).astype(np.int64)
            got = np.clip(np.clip(np.round(x / scale), 0, 255), low, high).astype(np.int64)
            assert np.mean(got == expected) > 0.999 and np.abs(got - expected).max() <= 1, (bits, lo, hi, activation)
    with pytest.raises(ValueError, match='uint8 with zero point 0'):
        onnx_model.activation_grid(3.0, 4.0, 8, 'relu')     # 8-bit grid values 765 .. 1020


def test_int8_parts_sum_to_the_grid_values():
    values = np.arange(-255, 256).reshape(511, 1)
    parts = onnx_model.int8_parts(values)
    assert len(parts) == 3 and all(p.dtype == np.int8 and np.abs(p).max() <= 127 for p in parts)
    np.testing.assert_array_equal(sum(p.astype(np.int32) for p in parts), values)
    assert len(onnx_model.int8_parts(np.arange(-127, 128))) == 1
    assert len(onnx_model.int8_parts(np.arange(-254, 255))) == 2


@pytest.mark.parametrize('w_bits,gamma_sign', [(8, 1), (4, -1), (2, 1)])
def test_a_conv_block_on_a_quantized_input_is_the_students_conv_and_batch_norm(w_bits, gamma_sign):
    """One conv-BN block from its integer form: int8 kernels (two or three of them for 8-bit
    grids), BatchNorm folded (a negative gamma flips the channel's signs), against the float
    conv of the dequantized operands then BN, in numpy (no requantization: nothing to round)."""
    rng = np.random.default_rng(w_bits)
    w = rng.normal(0, 0.3, (3, 3, 5, 6)).astype(np.float32)
    w[..., 0] = np.abs(w[..., 0]) + 0.5                 # a channel whose range excludes 0
    q, zero_point, s_w = (np.asarray(a) for a in quant.quantize_to_grid(w, *quant.weight_range(w), w_bits))
    arrays = {'b/conv/q': q.astype(np.int8), 'b/conv/zero_point': zero_point.reshape(-1).astype(np.int32),
              'b/conv/scale': s_w.reshape(-1).astype(np.float32),
              'b/bn/scale': (gamma_sign * rng.uniform(0.5, 1.5, 6)).astype(np.float32),
              'b/bn/bias': rng.normal(0, 1, 6).astype(np.float32), 'b/bn/mean': rng.normal(0, 1, 6).astype(np.float32),
              'b/bn/var': rng.uniform(0.5, 2, 6).astype(np.float32)}
    v_a = rng.integers(0, 16, (2, 5, 7, 7)).astype(np.uint8)
    x_scale = np.float32(0.13)
    builder = onnx_model._Builder(qlinear=False)
    y = builder.conv_block(onnx_model.Quantized('x', x_scale), arrays, 'b', 2, None, 4)
    graph = onnx.helper.make_graph(builder.nodes, 'block', [onnx.helper.make_tensor_value_info('x', onnx.TensorProto.UINT8, [2, 5, 7, 7])],
                                   [onnx.helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, None)], builder.initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid('', onnx_model.OPSET)])
    model.ir_version = 8
    got = onnx_model.session(model.SerializeToString()).run(None, {'x': v_a})[0]
    kernel = (q.astype(np.float64) + zero_point) / s_w                              # the fake-quantized kernel
    x = np.pad(v_a.astype(np.float64) * x_scale, ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = sum(np.einsum('nchw,co->nohw', x[:, :, i:i + 7:2, j:j + 7:2], kernel[i, j]) for i in range(3) for j in range(3))
    bn = lambda p: arrays[f'b/bn/{p}'].astype(np.float64).reshape(1, -1, 1, 1)
    expected = (conv - bn('mean')) / np.sqrt(bn('var') + 1e-5) * bn('scale') + bn('bias')
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    grid = np.abs(q.astype(np.int32) + zero_point.astype(np.int32))
    parts = [n for n in builder.nodes if n.op_type == 'ConvInteger']
    assert len(parts) == len(onnx_model.int8_parts(grid)) and (len(parts) > 1) == (grid.max() > 127)
    if w_bits == 8:
        assert len(parts) >= 2, 'the split into int8 kernels would go untested'


@pytest.fixture(scope='module')
def digits_onnx_export(digits_teacher, tmp_path_factory):
    """The digits teacher quantized at W3A8 and exported with --format=onnx through `bag-jax
    export`: (model, variables, dataset, export directory, stdout)."""
    tmp_path = tmp_path_factory.mktemp('digits_onnx')
    model, variables, meta, dataset = ptq_student(digits_teacher, 3, 8)
    student = save_student(tmp_path, 'student', variables, meta)
    out = tmp_path / 'export'
    assert cli.main(['export', '--checkpoint', student, '--out', str(out), '--format', 'onnx']) == 0
    return model, variables, dataset, out


def test_onnx_export_of_the_digits_student(digits_onnx_export):
    model, variables, dataset, out = digits_onnx_export
    assert sorted(os.listdir(out)) == ['export.json', 'model.onnx', 'weights.npz']
    onnx.checker.check_model(onnx.load(str(out / 'model.onnx')), full_check=True)
    report = json.loads((out / 'export.json').read_text())
    assert report['format'] == 'onnx' and 'agreement' not in report and 'jax_export' not in report
    assert report['onnx']['opset'] == onnx_model.OPSET == onnx.load(str(out / 'model.onnx')).opset_import[0].version
    # Every conv whose input is a quantized activation (all but the first) and the classifier:
    # an integer operator in the graph onnxruntime runs; the first conv, on the normalized image, float.
    quantized_input_layers = len(kernels(variables)) - 1
    operators = report['onnx']['optimized_operators']
    assert operators == onnx_model.optimized_operators(str(out / 'model.onnx'))
    assert report['onnx']['integer_layers'] == quantized_input_layers == integer_count(operators)
    assert operators['MatMulInteger'] == 1 and float_conv_count(operators) == 1
    assert report['onnx']['float_layers'] == ['init_block/conv']

    agreement = report['onnx']['agreement']
    assert agreement['images'] == len(dataset.x_test) == 450
    assert agreement['prediction_agreement'] >= export.AGREEMENT_BAR
    # The model file itself, against the fake-quantized student: float rounding, not an approximation.
    fake = np.asarray(model.apply(variables, data.normalize(dataset.x_test, dataset.info)))
    logits = onnx_model.session(str(out / 'model.onnx')).run(None, {'images': dataset.x_test})[0]
    assert len(np.unique(fake.argmax(1))) == 10, 'a collapsed student would agree trivially'
    assert np.mean(fake.argmax(1) == logits.argmax(1)) >= export.AGREEMENT_BAR
    diff = np.abs(fake - logits)
    assert np.mean(diff <= 1e-4 * (1 + np.abs(fake))) >= 0.99
    assert agreement['max_abs_logit_diff'] == pytest.approx(float(diff.max()), rel=1e-4, abs=1e-6)


def test_format_all_writes_both_models(digits_teacher, tmp_path):
    """--format=all writes model.jax and model.onnx, each agreeing with the student, and what
    model.jax depends on."""
    model, variables, meta, _ = ptq_student(digits_teacher, 6, 8)
    student = save_student(tmp_path, 'student', variables, meta)
    out = tmp_path / 'export'
    assert export.main(['--checkpoint', student, '--out', str(out), '--format', 'all']) == 0
    assert sorted(os.listdir(out)) == ['export.json', 'model.jax', 'model.onnx', 'weights.npz']
    report = json.loads((out / 'export.json').read_text())
    assert report['agreement']['prediction_agreement'] >= export.AGREEMENT_BAR
    assert report['onnx']['agreement']['prediction_agreement'] >= export.AGREEMENT_BAR
    assert report['onnx']['integer_layers'] == len(kernels(variables)) - 1
    assert report['model_onnx_bytes'] == os.path.getsize(out / 'model.onnx')
    info = report['jax_export']
    assert info['jax_version'] == jax.__version__ and info['calling_convention_version'] >= 9
    assert isinstance(info['serialization_version'], int)
    written = datetime.date.fromisoformat(info['written'])
    assert info['loads_until'] == export.jax_export_info((out / 'model.jax').read_bytes(), written)['loads_until']


def test_jax_export_loads_until_six_months_later():
    serialized = _tiny_serialized()
    for day, until in (('2026-12-06', '2027-06-06'), ('2026-08-31', '2027-02-28'), ('2027-12-31', '2028-06-30')):
        assert export.jax_export_info(serialized, datetime.date.fromisoformat(day))['loads_until'] == until


def _tiny_serialized() -> bytes:
    from jax import export as jax_export
    return jax_export.export(jax.jit(lambda x: x + 1))(jax.ShapeDtypeStruct((2,), np.float32)).serialize()


def test_without_onnx_the_export_writes_the_jax_files_and_says_how(digits_teacher, tmp_path, monkeypatch, capsys):
    model, variables, meta, _ = ptq_student(digits_teacher, 4, 4)
    student = save_student(tmp_path, 'student', variables, meta)
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)          # import onnxruntime raises ImportError
    out = tmp_path / 'export'
    capsys.readouterr()
    assert cli.main(['export', '--checkpoint', student, '--out', str(out), '--format', 'onnx', '--no_agreement']) == 0
    assert sorted(os.listdir(out)) == ['export.json', 'model.jax', 'weights.npz']
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'pip install "bag-jax[onnx]"' in err
    report = json.loads((out / 'export.json').read_text())
    assert report['onnx'] == {'written': False, 'reason': export.ONNX_MISSING}
    with pytest.raises(ValueError, match="--format='onnx2' is not allowed"):
        export.export(student, str(tmp_path / 'other'), fmt='onnx2')


@pytest.fixture(scope='module', params=FIXTURES)
def imagenet_student(request):
    """(name, model, variables, meta, ONNX model, its optimized operators) of a W4A4 student of
    the fixture at 32x32."""
    model, variables, meta = fixture_student(request.param, 4, 4, 32)
    arrays = integer_inference.integer_form(model, variables)
    built = onnx_model.build(arrays, meta)
    return request.param, model, variables, meta, built, onnx_model.optimized_operators(built.SerializeToString())


def expected_float_layers(name, model):
    """The convs whose input the student does not quantize: the first; in MobileNetV2 also every
    expansion 1x1 but the first unit's (its input is the stem's QuantAct) and the final 1x1."""
    if name.startswith('mobilenet'):
        units = sum(len(stage) for stage in model.channels)
        return 1 + (units - 1) + 1
    return 1


def test_imagenet_architectures_run_with_integer_operators(imagenet_student):
    name, model, variables, meta, built, operators = imagenet_student
    onnx.checker.check_model(built, full_check=True)
    floats = expected_float_layers(name, model)
    integer_layers, float_layers = onnx_model.layer_lists(built)
    assert len(float_layers) == floats and len(integer_layers) + floats == len(kernels(variables))
    assert integer_count(operators) == len(integer_layers) and operators['MatMulInteger'] == 1
    assert float_conv_count(operators) == floats
    if name.startswith('resnet'):
        assert operators.get('MaxPool') == 1


def test_imagenet_architectures_agree_with_the_student(imagenet_student):
    name, model, variables, meta, built, _ = imagenet_student
    images = np.random.default_rng(1).integers(0, 256, (64, 32, 32, 3)).astype(np.uint8)
    info = data.DatasetInfo.from_dict(meta['data'])
    fake = np.asarray(jax.jit(lambda v, x: model.apply(v, data.normalize(x, info)))(variables, images))
    logits = onnx_model.session(built.SerializeToString()).run(None, {'images': images})[0]
    # Random images give few distinct classes: the logits themselves are compared below.
    assert np.std(fake, axis=0).mean() > 1e-3 * np.abs(fake).max(), 'a student blind to its input agrees trivially'
    assert np.mean(fake.argmax(1) == logits.argmax(1)) >= export.AGREEMENT_BAR
    diff = np.abs(fake - logits)
    assert np.mean(diff <= 1e-4 * (1 + np.abs(fake).max())) >= 0.99, (name, float(diff.max()))


def test_qlinear_form_makes_qlinearconv_of_every_conv_bn_relu_quantact(imagenet_student):
    """The QDQ form (not the default: its int32 bias is not exact): onnxruntime fuses every
    DequantizeLinear -> Conv -> QuantizeLinear on a quantized input into QLinearConv."""
    name, model, variables, meta, _, _ = imagenet_student
    built = onnx_model.build(integer_inference.integer_form(model, variables), meta, qlinear=True)
    operators = onnx_model.optimized_operators(built.SerializeToString())
    integer_layers, _ = onnx_model.layer_lists(built)
    # Blocks with a QuantAct whose input is quantized: the residual units' first convs (and the
    # bottleneck's second), MobileNetV2's first unit's 1x1 and every depthwise conv.
    units = sum(len(stage) for stage in model.channels)
    expected = {'resnet18_wd4': units, 'resnet50_wd8': 2 * units, 'mobilenetv2_w1_wd4': 1 + units}[name]
    assert operators.get('QLinearConv', 0) == expected
    assert integer_count(operators) == len(integer_layers)

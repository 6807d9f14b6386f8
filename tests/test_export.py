"""Deployable students: bit packing, integer inference against the fake-quantized student, the
exported module run without bag-jax, and the export command's checks."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from bag_jax import checkpoint, data, export, integer_inference
from tests.conftest import tiny_config
from tests.students import ptq_student


@pytest.mark.parametrize('bits', [2, 3, 4, 5, 6, 7, 8])
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    for count in (1, 7, 8, 9, 1000):
        values = rng.integers(0, 2**bits, count)
        values[:2] = [0, 2**bits - 1][:count]
        packed = export.pack_bits(values, bits)
        assert packed.dtype == np.uint8 and packed.size == -(-count * bits // 8)
        np.testing.assert_array_equal(export.unpack_bits(packed, bits, count), values)
    assert export.pack_bits(np.arange(8) % 8, 3).size == 3          # eight 3-bit values in three bytes
    with pytest.raises(ValueError, match=f'does not fit in {bits} bits'):
        export.pack_bits(np.array([2**bits]), bits)


@pytest.mark.parametrize('w_bits,a_bits', [(8, 8), (6, 8)])
def test_integer_inference_reproduces_the_fake_quantized_student(digits_teacher, w_bits, a_bits):
    model, variables, meta, dataset = ptq_student(digits_teacher, w_bits, a_bits)
    arrays = integer_inference.integer_form(model, variables)
    assert all(arrays[name].dtype == np.int8 for name in arrays if name.endswith('/q'))
    assert max(int(np.abs(arrays[n]).max()) for n in arrays if n.endswith('/q')) <= 2**(w_bits - 1)
    fake = np.asarray(model.apply(variables, data.normalize(dataset.x_test, dataset.info)))
    integer = np.asarray(jax.jit(integer_inference.make_forward(arrays, meta))(dataset.x_test))
    assert len(np.unique(fake.argmax(1))) == 10, 'a collapsed student would agree trivially'
    assert np.mean(fake.argmax(1) == integer.argmax(1)) >= export.AGREEMENT_BAR
    # Float rounding, not an approximation: almost every logit equal to float32 precision.
    diff = np.abs(fake - integer)
    assert np.mean(diff <= 1e-4 * (1 + np.abs(fake))) >= 0.99 and diff.mean() < 1e-2


def test_export_writes_packed_weights_and_a_module_that_runs_without_bag_jax(digits_teacher, tmp_path):
    model, variables, meta, dataset = ptq_student(digits_teacher, 3, 8)
    student_dir = str(tmp_path / 'student')
    checkpoint.save_model(student_dir, variables, {k: v for k, v in meta.items() if k != 'kind'}, 'student')
    out = tmp_path / 'export'
    assert export.main(['--checkpoint', student_dir, '--out', str(out)]) == 0
    assert sorted(os.listdir(out)) == ['export.json', 'model.jax', 'weights.npz']
    report = json.loads((out / 'export.json').read_text())
    assert (report['w_bits'], report['a_bits'], report['arch']) == (3, 8, 'resnet_cifar')
    assert report['integer_arithmetic'] == {'cpu': True, 'cuda': False, 'tpu': False}
    # 3-bit kernels: 3/32 of their float32 bytes.
    assert report['packed_kernel_bytes'] == sum(-(-a.size * 3 // 8) for n, a in integer_inference.integer_form(
        model, variables).items() if n.endswith('/q'))
    assert report['packed_kernel_bytes'] < report['float32_kernel_bytes'] * 3 / 32 + 64
    agreement = report['agreement']
    assert agreement['images'] == 450 and agreement['prediction_agreement'] >= export.AGREEMENT_BAR
    assert abs(agreement['integer_top1'] - agreement['student_top1']) <= 0.3

    # The weights: plain arrays, the integer form exactly.
    arrays, written_meta = export.load_weights(str(out / 'weights.npz'))
    expected = integer_inference.integer_form(model, variables)
    assert arrays.keys() == expected.keys() and written_meta['quant']['w_bits'] == 3
    for name in expected:
        np.testing.assert_array_equal(arrays[name], expected[name], err_msg=name)

    # model.jax in a fresh Python that has jax and numpy but cannot import bag_jax.
    images = dataset.x_test[:5]
    np.save(tmp_path / 'images.npy', images)
    program = ('import sys, numpy as np; from jax import export; '
               f'model = export.deserialize(open({str(out / "model.jax")!r}, "rb").read()); '
               f'logits = model.call(np.load({str(tmp_path / "images.npy")!r})); '
               f'np.save({str(tmp_path / "logits.npy")!r}, np.asarray(logits)); '
               'assert not any(m.startswith("bag_jax") for m in sys.modules); '
               'print(model.platforms, model.in_avals)')
    result = subprocess.run([sys.executable, '-c', program], cwd=tmp_path, capture_output=True, text=True,
                            env={'PATH': os.environ.get('PATH', ''), 'JAX_PLATFORMS': 'cpu'}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "('cpu', 'cuda', 'tpu')" in result.stdout and 'uint8[batch,8,8,1]' in result.stdout
    forward = jax.jit(integer_inference.make_forward(arrays, written_meta))
    np.testing.assert_allclose(np.load(tmp_path / 'logits.npy'), forward(images), rtol=1e-5, atol=1e-5)


def element_types(lowered_text: str) -> list[tuple[str, ...]]:
    """(lhs, rhs, result) element types of every convolution of a StableHLO program."""
    signatures = re.findall(r'stablehlo\.convolution.* : \((tensor<.*?>), (tensor<.*?>)\) -> (tensor<.*?>)$',
                            lowered_text, re.M)
    return [tuple(t[len('tensor<'):-1].split('x')[-1] for t in signature) for signature in signatures]


def test_model_jax_is_integer_on_cpus_and_dequantized_float_on_gpus_and_tpus(digits_teacher):
    """XLA on GPUs hands integer convolutions to cuDNN, which cannot accumulate int8 in int32 (an
    H100 refused the integer program): each platform's compiler gets what it supports."""
    model, variables, meta, dataset = ptq_student(digits_teacher, 3, 8)
    arrays = integer_inference.integer_form(model, variables)
    forward = jax.jit(integer_inference.make_forward(arrays, meta))
    images = dataset.x_test
    traced = forward.trace(images[:2])
    convolutions = {platform: element_types(traced.lower(lowering_platforms=(platform,)).as_text())
                    for platform in export.PLATFORMS}
    # CPU: the first conv on the normalized image in float, the others from int8 operands into int32.
    assert convolutions['cpu'][0] == ('f32', 'f32', 'f32')
    assert set(convolutions['cpu'][1:]) == {('i8', 'i8', 'i32')}, convolutions['cpu']
    for platform in ('cuda', 'tpu'):
        assert set(convolutions[platform]) == {('f32', 'f32', 'f32')}, (platform, convolutions[platform])
    # What GPUs and TPUs compute, computed here: the student's predictions, as the integer form's.
    integer = np.asarray(forward(images))
    floating = np.asarray(jax.jit(integer_inference.dequantized_forward(arrays, meta))(images))
    fake = np.asarray(model.apply(variables, data.normalize(images, dataset.info)))
    assert np.mean(floating.argmax(1) == integer.argmax(1)) >= export.AGREEMENT_BAR
    assert np.mean(floating.argmax(1) == fake.argmax(1)) >= export.AGREEMENT_BAR
    # The same kernels and quantizers: logits equal to float32 precision but where an activation
    # on a rounding boundary stepped a level.
    assert np.mean(np.abs(floating - fake) <= 1e-4 * (1 + np.abs(fake))) >= 0.99


def test_export_refuses_bad_input_and_leaves_nothing_half_written(digits_teacher, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / 'out')
    with pytest.raises(ValueError, match=r"is a full-precision teacher: integer inference needs a student"):
        export.export(digits_teacher, out)
    model, variables, meta, _ = ptq_student(digits_teacher, 8, 8)
    wide = str(tmp_path / 'w10')
    checkpoint.save_model(wide, variables, {**{k: v for k, v in meta.items() if k != 'kind'},
                                            'quant': {**meta['quant'], 'w_bits': 10}}, 'student')
    with pytest.raises(ValueError, match=r'is a W10A8 student: .* at most 8'):
        export.export(wide, out)
    with pytest.raises(FileNotFoundError, match='is not a teacher or student checkpoint'):
        export.export(str(tmp_path / 'missing'), out)
    good = str(tmp_path / 'student')
    checkpoint.save_model(good, variables, {k: v for k, v in meta.items() if k != 'kind'}, 'student')
    with open(os.path.join(good, checkpoint.STUDENT_META)) as f:
        text = f.read()
    broken = str(tmp_path / 'broken')
    os.makedirs(broken)
    os.symlink(os.path.join(good, checkpoint.VARIABLES), os.path.join(broken, checkpoint.VARIABLES))
    with open(os.path.join(broken, checkpoint.STUDENT_META), 'w') as f:
        f.write(text[:len(text) // 2])
    with pytest.raises(checkpoint.CheckpointError, match=r'student.json is damaged'):
        export.export(broken, out)
    (tmp_path / 'a_file').write_text('not a directory')
    with pytest.raises(PermissionError, match='missing or not writable'):
        export.export(good, str(tmp_path / 'a_file' / 'out'))
    os.makedirs(tmp_path / 'users_data')
    with pytest.raises(ValueError, match='exists and is not an earlier export'):
        export.export(good, str(tmp_path / 'users_data'))
    # A failure while writing leaves neither OUT nor its partial directory.
    monkeypatch.setattr(export, 'serialize_forward', lambda *a: (_ for _ in ()).throw(RuntimeError('disk full')))
    with pytest.raises(RuntimeError, match='disk full'):
        export.export(good, out)
    assert not os.path.exists(out) and not os.path.exists(out + checkpoint.PARTIAL_SUFFIX)
    # The command line: one line, exit status 1.
    assert export.main(['--checkpoint', digits_teacher, '--out', out]) == 1
    assert capsys.readouterr().err.count('\n') == 1


def write_digits_npz(path, dataset, invert_train=False):
    """The digits as a data.npz_path file; `invert_train`: the training images 255 - x, so that
    the file's normalization statistics differ from the digits' (the test images are the same)."""
    x_train = 255 - dataset.x_train if invert_train else dataset.x_train
    np.savez(path, x_train=x_train, y_train=dataset.y_train, x_test=dataset.x_test, y_test=dataset.y_test)
    return str(path)


def test_export_and_evaluate_find_the_npz_a_student_was_quantized_on(digits_teacher, tmp_path, capsys):
    """A student quantized with data.name=npz records its npz_path (student.json), and export
    and evaluate score on it with no data flag (export used to stop: data.name=npz needs
    data.npz_path); a flag overrides it."""
    from bag_jax import experiment
    from configs import evaluate as evaluate_config
    model, variables, meta, dataset = ptq_student(digits_teacher, 3, 8)
    npz = write_digits_npz(tmp_path / 'digits.npz', dataset)
    config = tiny_config()
    config.data.name, config.data.npz_path = 'npz', os.path.relpath(npz)
    info = data.DatasetInfo.from_dict(meta['data'])
    student_meta = checkpoint.model_meta(info, model, 'ptq', data_config=config.data, quant=meta['quant'])
    assert student_meta['data_source'] == {'name': 'npz', 'npz_path': npz}    # made absolute
    student_dir = str(tmp_path / 'student')
    checkpoint.save_model(student_dir, variables, student_meta, 'student')

    out = tmp_path / 'export'
    assert export.main(['--checkpoint', student_dir, '--out', str(out)]) == 0, capsys.readouterr().err
    agreement = json.loads((out / 'export.json').read_text())['agreement']
    assert (agreement['dataset'], agreement['images']) == ('npz', 450)
    assert agreement['prediction_agreement'] >= export.AGREEMENT_BAR

    c = evaluate_config.get_config()
    c.checkpoint = student_dir
    capsys.readouterr()
    summary = experiment.run(c, str(tmp_path / 'eval'))
    assert (summary['dataset'], summary['images'], summary['data']['npz_path']) == ('npz', 450, npz)
    assert (summary['w_bits'], summary['a_bits']) == (3, 8)
    printed = capsys.readouterr().out
    assert '| checkpoint | model | bits | dataset | images | top-1 % | top-5 % |' in printed
    assert f'| {os.path.abspath(student_dir)} | student resnet_cifar depth 8 | W3A8 | npz | 450 | ' in printed

    # The recorded file moved: the message says where the path came from and which flag overrides it.
    moved = str(tmp_path / 'moved.npz')
    os.rename(npz, moved)
    with pytest.raises(FileNotFoundError, match=r"no such file.*npz_path='.*digits.npz' is what the student "
                                                 r"checkpoint .* records as its data; pass --npz_path=\.\.\."):
        export.export(student_dir, str(tmp_path / 'export2'))
    assert export.main(['--checkpoint', student_dir, '--out', str(tmp_path / 'export2'), '--npz_path', moved]) == 0
    c.data.npz_path = moved
    assert experiment.run(c, str(tmp_path / 'eval2'))['images'] == 450


def test_export_normalizes_both_models_with_the_students_statistics(digits_teacher, tmp_path):
    """--npz_path with other normalization statistics than the student's (its training images
    inverted, the same test images): the fake-quantized student used to normalize with the file's
    statistics while the integer model used the checkpoint's, and the two disagreed. Also a
    student that records no data (saved before it was recorded): the flag gives it."""
    model, variables, meta, dataset = ptq_student(digits_teacher, 8, 8)
    student_dir = str(tmp_path / 'student')
    checkpoint.save_model(student_dir, variables, {k: v for k, v in meta.items() if k not in ('kind', 'data_source')},
                          'student')
    npz = write_digits_npz(tmp_path / 'inverted.npz', dataset, invert_train=True)
    report = export.export(student_dir, str(tmp_path / 'export'), {'name': 'npz', 'npz_path': npz})
    agreement = report['agreement']
    assert agreement['dataset'] == 'npz' and agreement['prediction_agreement'] >= export.AGREEMENT_BAR
    fake = np.asarray(model.apply(variables, data.normalize(dataset.x_test, dataset.info)))
    assert agreement['student_top1'] == pytest.approx(100 * np.mean(fake.argmax(1) == dataset.y_test))

"""The ImageNet path end to end, as docs/imagenet.md runs it, on CPU in seconds: the reduced-width
pytorchcv ResNet-18 fixture converted to a teacher, a folder of a few dozen JPEGs in WordNet-id
class folders (the usual way to hold the ImageNet validation set), the ImageNet config with the
224x224 generator's design at 32x32, quantized for two epochs of two iterations (the second epoch
resuming the first run), then the student evaluated and exported.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bag_jax import checkpoint, convert, data, settings
from tests.conftest import CACHE_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, 'tests', 'fixtures', 'imagenet', 'resnet18_wd4.pth')
CLASSES = 4
PER_CLASS = 6
IMAGE_SIZE = 32


def write_imagefolder(root, wnids, seed=0):
    rng = np.random.default_rng(seed)
    for wnid in wnids:
        os.makedirs(os.path.join(root, wnid))
        for i in range(PER_CLASS):
            h, w = rng.integers(36, 80, size=2)
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, wnid, f'ILSVRC2012_val_{i:08d}.JPEG'), quality=90)
    return root


def run_cli(*args, timeout=600):
    env = {**os.environ, **CACHE_ENV, 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3'}
    return subprocess.run([sys.executable, 'run.py', *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope='module')
def imagenet_run(tmp_path_factory):
    base = tmp_path_factory.mktemp('imagenet_path')
    teacher_dir = str(base / 'teacher')
    assert convert.main(['--pytorchcv', FIXTURE, '--out', teacher_dir]) == 0      # the command in docs/imagenet.md
    wnids = data.imagenet_class_ids()[::250][:CLASSES]                             # 4 of the 1000 classes
    folder = write_imagefolder(str(base / 'val'), wnids)
    workdir = str(base / 'run')
    args = ['--config=configs/imagenet_resnet18_w4a4.py', f'--workdir={workdir}',
            f'--config.teacher.checkpoint={teacher_dir}', '--config.data.name=imagefolder',
            f'--config.data.imagefolder_dir={folder}', f'--config.data.image_size={IMAGE_SIZE}',
            '--config.batch_size=4', '--config.iters_per_epoch=2', '--config.warmup_epochs=1',
            '--config.calibration_epochs=1', '--config.generator.latent_dim=16', '--config.eval_batch_size=8',
            '--config.image_grid_every=1']
    first = run_cli(*args, '--config.epochs=1')
    # SynQ and BAG with SynQ's terms on the same teacher and images (docs/algorithms.md 10): a
    # calibration epoch, then one on the pool (SynQ: low-pass filter at this size) or the generator.
    beyond = {}
    for method in ('synq', 'bag_synq'):
        beyond[method] = run_cli(*[a.replace('--config=configs/imagenet_resnet18_w4a4.py',
                                             f'--config=configs/imagenet_resnet18_w4a4.py:{method}')
                                   .replace(f'--workdir={workdir}', f'--workdir={base / method}') for a in args],
                                 '--config.epochs=2', '--config.pool.size=8', '--config.pool.batch_size=4',
                                 '--config.pool.steps=2', '--config.pool.train_batch_size=4',
                                 '--config.pool.low_pass=20', '--config.image_grid_every=0')
    second = run_cli(*args, '--config.epochs=2')      # extends the finished run: restores epoch 1, trains epoch 2
    return {'workdir': workdir, 'teacher': teacher_dir, 'folder': folder, 'wnids': wnids,
            'first': first, 'second': second, 'beyond': beyond, 'base': base}


def test_quantizes_and_resumes_through_the_imagenet_path(imagenet_run):
    for name in ('first', 'second'):
        result = imagenet_run[name]
        assert result.returncode == 0, result.stderr[-3000:]
    assert 'resuming after epoch 1 of 2' in imagenet_run['second'].stderr
    workdir = imagenet_run['workdir']
    with open(os.path.join(workdir, 'summary.json')) as f:
        summary = json.load(f)
    assert summary['epochs'] == 2 and summary['w_bits'] == summary['a_bits'] == 4 and summary['method'] == 'bag'
    assert 0.0 <= summary['teacher_top1'] <= 100.0 and 0.0 <= summary['last_top1'] <= 100.0
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        lines = [json.loads(line) for line in f]
    assert [line['step'] for line in lines] == [1, 2]
    assert all(np.isfinite(line['loss_g']) and np.isfinite(line['loss_s']) for line in lines)
    assert sorted(os.listdir(os.path.join(workdir, 'images'))) == ['epoch_0001.png', 'epoch_0002.png']
    kind, model, variables, meta = checkpoint.load_model(os.path.join(workdir, 'student'))
    assert kind == 'student' and meta['arch'] == 'resnet' and meta['num_classes'] == 1000
    assert (model.quant.w_bits, model.quant.a_bits) == (4, 4) and meta['epochs'] == 2
    assert meta['data']['mean'] == list(data.IMAGENET_MEAN)


def test_synq_and_bag_synq_run_on_the_imagenet_path(imagenet_run):
    for method, result in imagenet_run['beyond'].items():
        assert result.returncode == 0, f'{method}: {result.stderr[-3000:]}'
        with open(os.path.join(imagenet_run['base'], method, 'summary.json')) as f:
            summary = json.load(f)
        assert summary['method'] == method and summary['epochs'] == 2 and summary['w_bits'] == 4
        with open(os.path.join(imagenet_run['base'], method, 'metrics.jsonl')) as f:
            lines = [json.loads(line) for line in f]
        assert [line['step'] for line in lines] == [1, 2] and all(np.isfinite(line['loss_s']) for line in lines)
        if method == 'synq':     # the second epoch trains on the pool, not the generator
            assert lines[1]['loss_g'] == 0 and 'pool of seed 0' in result.stderr
        else:                    # the L_p clip when calibration ends
            assert 'activation ranges from the L_p search' in result.stderr


def test_evaluates_the_student_on_the_imagefolder(imagenet_run, tmp_path):
    from bag_jax import evaluate
    from configs import evaluate as evaluate_config
    c = evaluate_config.get_config()
    c.checkpoint = os.path.join(imagenet_run['workdir'], 'student')
    c.data.name = 'imagefolder'
    c.data.imagefolder_dir = imagenet_run['folder']
    c.data.image_size = IMAGE_SIZE
    c.eval_batch_size = 8
    summary = evaluate.run_evaluation(settings.parse(c), str(tmp_path))
    assert summary['images'] == CLASSES * PER_CLASS and summary['kind'] == 'student'
    # The same student, the same images: the last epoch's top-1 of the run.
    with open(os.path.join(imagenet_run['workdir'], 'summary.json')) as f:
        assert summary['top1'] == pytest.approx(json.load(f)['last_top1'], abs=1e-9)


def test_exports_the_imagenet_student(imagenet_run, tmp_path):
    """The same export command as for CIFAR students: packed weights, a model.jax that, for the
    ImageNet architectures, computes on the dequantized kernels (the student's own numbers), and
    a model.onnx whose convolutions on quantized inputs (all but the stem) and classifier are
    integer operators in onnxruntime."""
    from bag_jax import export
    out = str(tmp_path / 'export')
    student = os.path.join(imagenet_run['workdir'], 'student')
    assert export.main(['--checkpoint', student, '--out', out, '--imagefolder_dir', imagenet_run['folder'],
                        '--eval_batch_size', '8', '--format', 'all']) == 0
    with open(os.path.join(out, export.REPORT_FILE)) as f:
        report = json.load(f)
    assert report['arch'] == 'resnet' and not any(report['integer_arithmetic'].values()) and report['w_bits'] == 4
    assert report['packed_kernel_bytes'] * 8 == pytest.approx(report['float32_kernel_bytes'], rel=0.01)   # 4 of 32 bits
    a = report['agreement']
    assert a['images'] == CLASSES * PER_CLASS and a['prediction_agreement'] == 1.0
    assert a['max_abs_logit_diff'] < 1e-3 and a['integer_top1'] == a['student_top1']
    onnx_report = report['onnx']
    assert onnx_report['float_layers'] == ['init_block/conv/conv'] and onnx_report['integer_layers'] == 20   # 21 in all
    operators = onnx_report['optimized_operators']
    assert operators.get('ConvInteger', 0) + operators.get('MatMulInteger', 0) == 20
    assert onnx_report['agreement']['images'] == a['images']
    assert onnx_report['agreement']['prediction_agreement'] >= export.AGREEMENT_BAR

"""Quantized students for the export tests (tests/test_export.py, tests/test_onnx.py): the digits
teacher quantized after training, and the reduced-width ImageNet fixtures
(tests/fixtures/imagenet/) quantized with ranges calibrated on random images. Not a test
module: test modules import no other."""

import os

import jax
import jax.numpy as jnp

from bag_jax import checkpoint, convert, data, models
from bag_jax.models import ResNetCifar
from bag_jax.quant import QuantSpec
from tests.conftest import tiny_config

IMAGENET_FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'imagenet')
# ImageNet's normalization statistics (pytorchcv's), for the fixtures' students.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def ptq_student(teacher_dir, w_bits, a_bits):
    """The digits teacher quantized after training: weights at w_bits, activation ranges
    calibrated on 250 training digits. Returns (model, variables, meta, dataset)."""
    _, variables, meta = checkpoint.load_teacher(teacher_dir)
    dataset = data.load_dataset(tiny_config().data)
    model = ResNetCifar(num_classes=10, depth=meta['depth'], quant=QuantSpec(w_bits, a_bits))
    stats = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))['quant_stats']
    images = data.normalize(dataset.x_train[:250], dataset.info)
    for start in range(0, 250, 50):
        _, updated = model.apply({**variables, 'quant_stats': stats}, images[start:start + 50], calibrate=True,
                                 mutable=['quant_stats'])
        stats = updated['quant_stats']
    meta = {**meta, 'kind': 'student', 'quant': {'w_bits': w_bits, 'a_bits': a_bits, 'range_rule': 'reference',
                                                 'ste': 'identity'}}
    return model, {**variables, 'quant_stats': stats}, meta, dataset


def fixture_student(name, w_bits, a_bits, size, seed=0):
    """The ImageNet fixture `name` (resnet18_wd4, resnet50_wd8, mobilenetv2_w1_wd4) quantized at
    w_bits, a_bits, its activation ranges calibrated on one batch of 16 normalized random
    images (size x size). Returns (model, variables, meta) with meta as a student checkpoint
    records it (uint8 images of size x size x 3, ImageNet normalization)."""
    teacher, variables = convert.load_pytorchcv(os.path.join(IMAGENET_FIXTURES, f'{name}.pth'))
    spec = QuantSpec(w_bits, a_bits)
    model = models.quantized(teacher, spec)
    images = jax.random.normal(jax.random.PRNGKey(seed), (16, size, size, 3))
    stats = model.init(jax.random.PRNGKey(0), images[:1])['quant_stats']
    _, updated = jax.jit(lambda v, x: model.apply(v, x, calibrate=True, mutable=['quant_stats']))(
        {**variables, 'quant_stats': stats}, images)
    meta = {**models.describe(model), 'num_classes': model.num_classes, 'kind': 'student',
            'quant': {'w_bits': w_bits, 'a_bits': a_bits, 'range_rule': spec.range_rule, 'ste': spec.ste},
            'data': {'name': 'random', 'num_classes': model.num_classes, 'image_shape': [size, size, 3],
                     'mean': list(IMAGENET_MEAN), 'std': list(IMAGENET_STD), 'augment': 'none'}}
    return model, {**variables, **updated}, meta

"""Every shipped config validates; bad values name their field; run.py parses and dispatches."""

import json
import os
import subprocess
import sys

import pytest

from bag_jax import settings
from configs import (base, cifar100_teacher, cifar100_w3a3, cifar100_w4a4, cifar100_w5a5, cifar10_teacher,
                     cifar10_w3a3, cifar10_w4a4, cifar10_w5a5, digits_w3a3, imagenet_mobilenetv2_w4a4,
                     imagenet_resnet18_w4a4, imagenet_resnet50_w4a4)
from configs import evaluate as evaluate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('module', [cifar100_w3a3, cifar100_w4a4, cifar100_w5a5, cifar10_w3a3, cifar10_w4a4,
                                    cifar10_w5a5, digits_w3a3, imagenet_resnet18_w4a4, imagenet_resnet50_w4a4,
                                    imagenet_mobilenetv2_w4a4])
@pytest.mark.parametrize('method', ['gdfq', 'adadfq', 'bag'])
def test_quantization_configs_validate(module, method):
    c = module.get_config(method)
    settings.parse(c)
    assert c.method == method and c.mode == 'quantize'


def test_bit_widths_of_the_cifar_configs():
    for module, bits, name in [(cifar100_w3a3, 3, 'cifar100'), (cifar100_w4a4, 4, 'cifar100'),
                               (cifar100_w5a5, 5, 'cifar100'), (cifar10_w3a3, 3, 'cifar10'),
                               (cifar10_w4a4, 4, 'cifar10'), (cifar10_w5a5, 5, 'cifar10')]:
        c = module.get_config()
        assert (c.quant.w_bits, c.quant.a_bits, c.data.name) == (bits, bits, name)


def test_method_defaults_follow_the_reference_configs():
    gdfq, adadfq, bag = (cifar100_w3a3.get_config(m) for m in ('gdfq', 'adadfq', 'bag'))
    assert (gdfq.batch_size, gdfq.loss.bns, gdfq.generator.quantize, gdfq.loss.channel_attention) == (200, 0.1, False, 0)
    assert (adadfq.batch_size, adadfq.loss.bns, adadfq.generator.quantize, adadfq.loss.channel_attention) == (16, 1.0, False, 0)
    assert (bag.batch_size, bag.loss.bns, bag.generator.quantize) == (16, 1.0, True) and bag.loss.channel_attention > 0
    for c in (gdfq, adadfq, bag):
        assert (c.epochs, c.iters_per_epoch, c.warmup_epochs, c.calibration_epochs) == (400, 200, 4, 4)
        assert tuple(c.lr_milestones) == (100, 200, 300) and (c.student.lr, c.generator.lr) == (1e-4, 1e-3)
        assert (c.loss.alpha_ds, c.loss.alpha_as, c.loss.lambda_l, c.loss.lambda_u) == (0.2, 0.1, 0.1, 0.8)
    with pytest.raises(ValueError, match="'zeroq' is not a method"):
        base.get_config('zeroq')


def test_imagenet_configs_follow_the_reference():
    """docs/imagenet.md 5: the W4A4 values of the reference's ImageNet config comments."""
    expected = {imagenet_resnet18_w4a4: ('pytorchcv:resnet18', 1e-5, (350, 400), 0.2, 0.3),
                imagenet_mobilenetv2_w4a4: ('pytorchcv:mobilenetv2_w1', 1e-5, (350, 400), 0.3, 0.1),
                imagenet_resnet50_w4a4: ('pytorchcv:resnet50', 1e-4, (200, 300, 400), 0.1, 0.3)}
    for module, (teacher, lr, milestones, alpha_ds, lambda_l) in expected.items():
        for method in ('adadfq', 'bag'):
            c = module.get_config(method)
            assert (c.teacher.checkpoint, c.student.lr, tuple(c.lr_milestones), c.loss.alpha_ds, c.loss.lambda_l) == (
                teacher, lr, milestones, alpha_ds, lambda_l)
            assert (c.quant.w_bits, c.quant.a_bits, c.batch_size, c.warmup_epochs, c.loss.temperature) == (4, 4, 16, 50, 5.0)
            assert (c.data.name, c.data.image_size, c.generator.conditioning) == ('imagenet2012', 224, 'batchnorm')
            assert c.generator.quantize == (method == 'bag')
        gdfq = module.get_config('gdfq')
        assert (gdfq.batch_size, gdfq.student.lr, tuple(gdfq.lr_milestones), gdfq.loss.temperature, gdfq.loss.bns) == (
            16, 1e-6, (100, 200, 300), 20.0, 0.1)


def test_imagenet_data_needs_a_teacher_checkpoint():
    c = imagenet_resnet18_w4a4.get_config()
    c.teacher.checkpoint = None
    with pytest.raises(ValueError, match=r"data.name='imagenet2012' holds evaluation images only.*pytorchcv:resnet18"):
        settings.parse(c)
    c.generator.conditioning = 'film'
    c.teacher.checkpoint = 'pytorchcv:resnet18'
    with pytest.raises(ValueError, match="generator.conditioning='film' is not allowed"):
        settings.parse(c)


def test_other_configs_validate():
    settings.parse(cifar100_teacher.get_config())
    assert cifar10_teacher.get_config().data.name == 'cifar10'
    c = evaluate_config.get_config()
    with pytest.raises(ValueError, match='checkpoint is unset'):
        settings.parse(c)
    c.checkpoint = '/some/dir'
    settings.parse(c)


BAD_VALUES = [
    ('mode', 'train', "mode='train' is not allowed: choose one of 'quantize', 'teacher', 'evaluate'"),
    ('method', 'qimera', "method='qimera' is not allowed"),
    ('quant.w_bits', 0, 'quant.w_bits=0 is not a valid bit-width: use an integer from 1 to 16, or 32'),
    ('quant.a_bits', 20, 'quant.a_bits=20'),
    ('quant.range_rule', 'minmax', "quant.range_rule='minmax'.*'reference', 'ema'"),
    ('quant.ste', 'soft', "quant.ste='soft'"),
    ('batch_size', 1, 'batch_size=1 is not allowed: use an integer of at least 2'),
    ('epochs', 0, 'epochs=0'),
    ('iters_per_epoch', -3, 'iters_per_epoch=-3'),
    ('seed', -1, 'seed=-1'),
    ('num_seeds', 0, 'num_seeds=0'),
    ('warmup_epochs', 401, 'warmup_epochs=401 is not allowed: use an integer of at least 0 and at most 400'),
    ('lr_milestones', (300, 100), 'lr_milestones=.*increasing'),
    ('student.lr', 0.0, 'student.lr=0.0 is not allowed: use a number greater than 0'),
    ('loss.lambda_l', 0.9, 'loss.lambda_l=0.9 is above loss.lambda_u=0.8'),
    ('loss.channel_attention', -1.0, 'loss.channel_attention=-1.0'),
    ('loss.channel_attention_form', 'kl', "loss.channel_attention_form='kl'"),
    ('data.name', 'imagenet', "data.name='imagenet' is not allowed: choose one of 'cifar100', 'cifar10', 'digits', 'npz'"),
    ('teacher.depth', 18, 'teacher.depth=18 is not a basic-block CIFAR ResNet depth'),
    ('teacher.checkpoint', '', "teacher.checkpoint='' is not allowed"),
    ('data.digits_test_fraction', 1.0, 'data.digits_test_fraction=1.0 is not allowed: use a fraction in \\(0, 1\\)'),
    ('data.digits_test_fraction', 0.0, 'data.digits_test_fraction=0.0 is not allowed'),
]


def with_field(c, field: str, value):
    """`c` with the dotted `field` set to `value` (any value: validation is what is tested)."""
    node = c
    *path, last = field.split('.')
    for part in path:
        node = node[part]
    with c.unlocked():
        node[last] = value
    return c


@pytest.mark.parametrize('field,value,message', BAD_VALUES)
def test_bad_values_name_the_field(field, value, message):
    c = with_field(cifar100_w3a3.get_config(), field, value)
    with pytest.raises(ValueError, match=message):
        settings.parse(c)


NON_FINITE = [
    ('student.lr', float('inf'), r'student\.lr=inf is not allowed: use a finite number greater than 0'),
    ('student.lr', float('nan'), r'student\.lr=nan is not allowed: use a finite number greater than 0'),
    ('loss.kd', float('inf'), r'loss\.kd=inf is not allowed: use a finite number at least 0'),
    ('loss.temperature', float('inf'), r'loss\.temperature=inf is not allowed: use a finite number greater than 0'),
    ('student.weight_decay', float('inf'), r'student\.weight_decay=inf is not allowed: use a finite number at least 0'),
    ('teacher.lr', -float('inf'), r'teacher\.lr=-inf is not allowed: use a finite number greater than 0'),
    ('teacher.weight_decay', float('inf'), r'teacher\.weight_decay=inf is not allowed: use a finite number'),
    ('loss.channel_attention', float('inf'), r'loss\.channel_attention=inf is not allowed: use a finite number'),
]


@pytest.mark.parametrize('field,value,message', NON_FINITE)
def test_non_finite_numbers_are_refused_naming_field_value_and_what_is_allowed(field, value, message):
    c = with_field(cifar100_w3a3.get_config(), field, value)
    with pytest.raises(ValueError, match=message + r'.*\(nan, inf and -inf are refused\)'):
        settings.parse(c)


def test_non_finite_numbers_are_refused_in_every_mode():
    """A field the mode does not use is refused too (a teacher run with student.lr=inf)."""
    c = cifar100_teacher.get_config()
    c.student.lr = float('inf')
    with pytest.raises(ValueError, match=r'student\.lr=inf is not allowed: use a finite number \(nan, inf and -inf '
                                         r'are refused\)'):
        settings.parse(c)
    c = evaluate_config.get_config()
    c.checkpoint = '/some/dir'
    c.data.digits_test_fraction = float('nan')
    with pytest.raises(ValueError, match=r'data\.digits_test_fraction=nan is not allowed: use a finite number'):
        settings.parse(c)


def test_evaluate_leaves_unset_data_fields_to_the_checkpoint():
    """configs/evaluate.py: the data fields default to unset (the checkpoint's record); a source
    without its path passes validation, since the checkpoint may record it."""
    c = evaluate_config.get_config()
    c.checkpoint = '/some/dir'
    assert (c.data.name, c.data.npz_path, c.data.digits_test_fraction, c.data.image_size) == (None, None, None, None)
    settings.parse(c)
    c.data.name = 'npz'
    settings.parse(c)
    c.data.image_size = 0
    with pytest.raises(ValueError, match='data.image_size=0 is not allowed'):
        settings.parse(c)


def test_npz_needs_a_path():
    c = digits_w3a3.get_config()
    c.data.name = 'npz'
    with pytest.raises(ValueError, match='data.npz_path'):
        settings.parse(c)


def run_cli(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, 'run.py', *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3',
                                                **(env or {})})


def test_cli_overrides_reach_validation(tmp_path):
    # A bad value, an unknown field, an unknown flag, a bad config argument: one line each.
    cases = [
        (['--config=configs/cifar100_w3a3.py', '--config.quant.w_bits=0'],
         'run.py: error: quant.w_bits=0 is not a valid bit-width: use an integer from 1 to 16'),
        (['--config=configs/cifar100_w3a3.py:gdfq', '--config.quant.wbits=4'],
         "run.py: error: unknown config field 'quant.wbits': did you mean 'quant.w_bits', 'quant.a_bits'"),
        (['--config=configs/cifar100_w3a3.py', '--config.foo=1'], "run.py: error: unknown config field 'foo': "),
        (['--config=configs/cifar100_w3a3.py', '--config.w_bits=3'],
         "run.py: error: unknown config field 'w_bits': did you mean 'quant.w_bits'?"),
        (['--config=configs/cifar100_w3a3.py', '--config.quant.w_bits=three'],
         "run.py: error: flag --config.quant.w_bits=three: invalid literal for int()"),
        (['--config=configs/cifar100_w3a3.py:zeroq'],
         "run.py: error: flag --config=configs/cifar100_w3a3.py: ValueError: config argument 'zeroq' is not a method"),
    ]
    for args, message in cases:
        result = run_cli(*args, f'--workdir={tmp_path}')
        assert result.returncode == 1, (args, result.stderr[-2000:])
        assert result.stderr.startswith(message) and result.stderr.count('\n') == 1, (args, result.stderr[-2000:])
    assert not os.path.exists(tmp_path / 'config.json')     # refused before the workdir was claimed
    # The traceback, on request.
    result = run_cli('--config=configs/cifar100_w3a3.py', '--config.quant.w_bits=0', f'--workdir={tmp_path}',
                     env={'BAG_JAX_TRACEBACK': '1'})
    assert 'Traceback (most recent call last)' in result.stderr and 'quant.w_bits=0' in result.stderr
    result = run_cli('--config=configs/cifar100_w3a3.py')
    assert result.returncode != 0 and '--workdir' in result.stderr


def test_cli_refuses_inf_before_compiling(tmp_path):
    """`--config.student.lr=inf` used to be accepted and to fail at a NaN a minute later."""
    for flag, message in (('--config.student.lr=inf', 'run.py: error: student.lr=inf is not allowed: use a finite '
                                                      'number greater than 0'),
                          ('--config.loss.kd=-inf', 'run.py: error: loss.kd=-inf is not allowed: use a finite number'),
                          ('--config.generator.lr=nan', 'run.py: error: generator.lr=nan is not allowed')):
        result = run_cli('--config=tests/tiny_config.py', flag, f'--workdir={tmp_path}')
        assert result.returncode == 1 and result.stderr.startswith(message), (flag, result.stderr[-2000:])
        assert result.stderr.count('\n') == 1
    assert not os.path.exists(tmp_path / 'config.json')


def test_cli_cifar_without_data_says_what_to_do(tmp_path):
    result = run_cli('--config=configs/cifar100_w3a3.py', f'--config.data.tfds_dir={tmp_path / "tfds"}',
                     f'--workdir={tmp_path / "w"}')
    assert result.returncode != 0
    assert 'download_and_prepare' in result.stderr and 'data.tfds_dir' in result.stderr


def test_cli_end_to_end_on_digits(digits_teacher, tmp_path):
    result = run_cli('--config=configs/digits_w3a3.py', f'--config.teacher.checkpoint={digits_teacher}',
                     '--config.epochs=1', '--config.iters_per_epoch=2', '--config.warmup_epochs=0',
                     '--config.calibration_epochs=1', '--config.batch_size=8', '--config.generator.latent_dim=16',
                     f'--workdir={tmp_path}')
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / 'summary.json').exists() and (tmp_path / 'student' / 'student.json').exists()
    # The student records the data it was quantized with (evaluate and export use them).
    with open(tmp_path / 'student' / 'student.json') as f:
        assert json.load(f)['data_source'] == {'name': 'digits', 'digits_test_fraction': 0.25}

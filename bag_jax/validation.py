"""Checks a config before anything is loaded or compiled.

Every bad value raises ValueError naming the field (`quant.w_bits`), the value and what is
allowed, so a typo costs a second, not a compilation.
"""

from __future__ import annotations

import difflib
import math
import numbers
from typing import Any

from bag_jax import data, quant, sweep
from bag_jax.models.generator import CONDITIONINGS

MODES = ('quantize', 'teacher', 'evaluate')
METHODS = ('gdfq', 'adadfq', 'bag')
CHANNEL_ATTENTION_FORMS = ('energy', 'mean', 'softmax')
CHANNEL_ATTENTION_LAYERS = ('branch', 'conv', 'unit_out', 'stage_out')
EPOCH_LOOPS = ('auto', 'scan', 'python')


def flat_fields(record: dict[str, Any], prefix: str = '') -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: a config as a dict (`config.to_dict()`) by dotted field name."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict) and value:
            flat.update(flat_fields(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def unknown_field_message(config, field: str) -> str | None:
    """None if `field` (dotted) is a field of `config`; otherwise the message that says so and
    names the closest valid fields."""
    node = config
    for part in field.split('.'):
        if not hasattr(node, 'keys') or part not in node:
            break
        node = node[part]
    else:
        return None
    names = list(flat_fields(config.to_dict()))
    close = difflib.get_close_matches(field, names, n=3, cutoff=0.6)
    if not close:   # a misspelt last part under the right section, or the right name in another one
        last = field.rsplit('.', 1)[-1]
        close = [n for n in names if difflib.get_close_matches(last, [n.rsplit('.', 1)[-1]], cutoff=0.75)][:3]
    hint = f'did you mean {", ".join(repr(n) for n in close)}?' if close else 'docs/configs.md lists the fields.'
    return f'unknown config field {field!r}: {hint}'


def _get(config, field: str) -> Any:
    value = config
    for part in field.split('.'):
        if part not in value:
            raise ValueError(f'config field {field} is missing: start from a file in configs/, which sets every field.')
        value = value[part]
    return value


def _int(config, field: str, minimum: int, maximum: int | None = None) -> int:
    value = _get(config, field)
    bad = not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum or (
        maximum is not None and value > maximum)
    if bad:
        upper = f' and at most {maximum}' if maximum is not None else ''
        raise ValueError(f'{field}={value!r} is not allowed: use an integer of at least {minimum}{upper}.')
    return int(value)


def _number(config, field: str, minimum: float = 0.0, *, strict: bool = False, maximum: float | None = None) -> float:
    value = _get(config, field)
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    finite = real and math.isfinite(value)
    ok = finite and (value > minimum if strict else value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        bound = f'greater than {minimum}' if strict else f'at least {minimum}'
        upper = f' and at most {maximum}' if maximum is not None else ''
        if real and not finite:
            raise ValueError(f'{field}={value!r} is not allowed: use a finite number {bound}{upper} (nan, inf and '
                             '-inf are refused).')
        raise ValueError(f'{field}={value!r} is not allowed: use a number {bound}{upper}.')
    return float(value)


def check_finite(config) -> None:
    """Raises ValueError naming the first float field of `config` that is nan, inf or -inf (the
    sweep's values are checked by `sweep.sweep_of`): such a value would only surface as a NaN
    after compilation and a first epoch."""
    for field, value in flat_fields(config.to_dict()).items():
        if field == 'sweep' or field.startswith('sweep.'):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f'{field}={value!r} is not allowed: use a finite number (nan, inf and -inf are '
                             'refused).')


def _choice(config, field: str, allowed: tuple[str, ...]) -> str:
    return quant.check_choice(_get(config, field), allowed, field)


def _optional_str(config, field: str) -> str | None:
    value = _get(config, field)
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f'{field}={value!r} is not allowed: use a non-empty path, or leave it unset.')
    return value


def validate_data(config, name_optional: bool = False) -> None:
    """Checks the `data` section: the source name, its path fields and the ImageNet crop size;
    and that a teacher run (`mode='teacher'`) has training images."""
    if name_optional and _get(config, 'data.name') is None:
        name = None
    else:
        name = _choice(config, 'data.name', data.SOURCES)
    npz_path = _optional_str(config, 'data.npz_path')
    _optional_str(config, 'data.tfds_dir')
    imagefolder_dir = _optional_str(config, 'data.imagefolder_dir') if 'imagefolder_dir' in config.data else None
    # evaluate: unset means the checkpoint's recorded value (checkpoint.data_config_for).
    if 'image_size' in config.data and not (name_optional and config.data.image_size is None):
        _int(config, 'data.image_size', 1)
    # evaluate (name_optional): the checkpoint may record the path (checkpoint.data_config_for).
    if name == 'imagefolder' and imagefolder_dir is None and not name_optional:
        raise ValueError("data.name='imagefolder' needs data.imagefolder_dir: a folder with one subfolder of images "
                         'per class (ImageNet: val/n01440764/ILSVRC2012_val_00000293.JPEG, ...).')
    if name in data.STREAMING_SOURCES and config.get('mode') == 'teacher':
        raise ValueError(f'data.name={name!r} holds evaluation images only (no train split), so mode=teacher cannot '
                         'train on it: data-free quantization of an ImageNet model starts from a pretrained teacher '
                         '(teacher.checkpoint, e.g. pytorchcv:resnet18); training an ImageNet teacher is not supported.')
    if 'digits_test_fraction' in config.data and not (name_optional and config.data.digits_test_fraction is None):
        fraction = _number(config, 'data.digits_test_fraction', strict=True, maximum=1.0)
        if fraction >= 1.0:
            raise ValueError(f'data.digits_test_fraction={fraction!r} is not allowed: use a fraction in (0, 1).')
    if name == 'npz' and npz_path is None and not name_optional:
        raise ValueError("data.name='npz' needs data.npz_path: the .npz file with x_train, y_train, x_test, y_test.")


def validate_teacher(config) -> None:
    """Checks the `teacher` section (architecture and full-precision training settings)."""
    from bag_jax import zoo
    from bag_jax.models.resnet_cifar import units_per_stage
    if zoo.is_zoo_spec(_optional_str(config, 'teacher.checkpoint')):
        zoo.zoo_file(config.teacher.checkpoint)   # a known name, before anything is fetched
    units_per_stage(_get(config, 'teacher.depth'))
    for field in ('teacher.epochs', 'teacher.batch_size'):
        _int(config, field, 1)
    _number(config, 'teacher.lr', strict=True)
    _number(config, 'teacher.momentum', maximum=1.0)
    _number(config, 'teacher.weight_decay')
    _number(config, 'teacher.label_smoothing', maximum=1.0)


def validate_quantize(config) -> None:
    """Checks the fields of a data-free quantization run (method, bits, schedule, losses)."""
    _choice(config, 'method', METHODS)
    quant.check_bits(_get(config, 'quant.w_bits'), 'quant.w_bits')
    quant.check_bits(_get(config, 'quant.a_bits'), 'quant.a_bits')
    _choice(config, 'quant.range_rule', quant.RANGE_RULES)
    _choice(config, 'quant.ste', quant.STE_MODES)
    _int(config, 'seed', 0)
    _int(config, 'num_seeds', 1)
    if 'sweep' in config and sweep.sweep_of(config):
        for run_config in sweep.run_configs(config):   # each swept value as the field allows it
            try:
                validate_quantize(run_config)
            except ValueError as e:
                raise ValueError(f'in a run of the sweep: {e}') from None
    if config.get('data_parallel') is not None:
        _int(config, 'data_parallel', 1)
    _int(config, 'batch_size', 2)   # the generator's batch statistics need two samples
    epochs = _int(config, 'epochs', 1)
    _int(config, 'iters_per_epoch', 1)
    _int(config, 'warmup_epochs', 0, epochs)
    _int(config, 'calibration_epochs', 0, epochs)
    _int(config, 'eval_batch_size', 1)
    _choice(config, 'epoch_loop', EPOCH_LOOPS)
    _int(config, 'image_grid_every', 0)
    _int(config, 'log_every', 1)
    milestones = _get(config, 'lr_milestones')
    if not isinstance(milestones, (tuple, list)) or any(
            not isinstance(m, numbers.Integral) or m < 1 for m in milestones) or list(milestones) != sorted(milestones):
        raise ValueError(f'lr_milestones={milestones!r} is not allowed: use increasing positive epoch numbers, e.g. (100, 200, 300).')
    _number(config, 'lr_decay', strict=True, maximum=1.0)
    _int(config, 'generator.latent_dim', 1)
    _number(config, 'generator.lr', strict=True)
    _number(config, 'generator.b1', maximum=1.0)
    _number(config, 'generator.b2', maximum=1.0)
    for field in ('generator.quantize', 'generator.quantize_activations', 'student.nesterov'):
        if not isinstance(_get(config, field), bool):
            raise ValueError(f'{field}={_get(config, field)!r} is not allowed: use True or False.')
    _number(config, 'student.lr', strict=True)
    _number(config, 'student.momentum', maximum=1.0)
    _number(config, 'student.weight_decay')
    for field in ('loss.bns', 'loss.kd', 'loss.alpha_ds', 'loss.alpha_as', 'loss.balance', 'loss.channel_attention'):
        _number(config, field)
    _number(config, 'loss.temperature', strict=True)
    lambda_l = _number(config, 'loss.lambda_l', maximum=1.0)
    lambda_u = _number(config, 'loss.lambda_u', maximum=1.0)
    if lambda_l > lambda_u:
        raise ValueError(f'loss.lambda_l={lambda_l} is above loss.lambda_u={lambda_u}: the margin needs lambda_l <= lambda_u.')
    _choice(config, 'loss.channel_attention_form', CHANNEL_ATTENTION_FORMS)
    _choice(config, 'loss.channel_attention_layers', CHANNEL_ATTENTION_LAYERS)
    if 'conditioning' in config.generator:
        _choice(config, 'generator.conditioning', CONDITIONINGS)
    name = _get(config, 'data.name')
    if name in data.STREAMING_SOURCES and not _get(config, 'teacher.checkpoint'):
        raise ValueError(
            f"data.name={name!r} holds evaluation images only, so a quantization run cannot train its teacher: set "
            "teacher.checkpoint, e.g. --config.teacher.checkpoint=pytorchcv:resnet18 (or pytorchcv:resnet50, "
            "pytorchcv:mobilenetv2_w1: the zoo weights the papers used, fetched once), or a directory made by "
            "`python -m bag_jax.convert --pytorchcv FILE.pth --out DIR`.")


def validate_config(config) -> None:
    """Checks every field the config's mode uses, and that no float field of any mode is
    nan or inf; raises ValueError on the first bad one."""
    mode = _choice(config, 'mode', MODES)
    validate_data(config, name_optional=mode == 'evaluate')
    if mode in ('quantize', 'teacher'):
        validate_teacher(config)
    if mode == 'quantize':
        validate_quantize(config)
    if mode == 'evaluate':
        _optional_str(config, 'checkpoint')
        if _get(config, 'checkpoint') is None:
            raise ValueError('checkpoint is unset: pass --config.checkpoint=DIR, a teacher or student checkpoint.')
        _int(config, 'eval_batch_size', 1)
    check_finite(config)


def check_device_split(config, device_count: int) -> None:
    """Raises ValueError unless every global batch the config's mode uses splits evenly over
    `device_count` devices (checked before anything is loaded)."""
    fields = {'quantize': ['batch_size', 'eval_batch_size', 'teacher.batch_size'],
              'teacher': ['teacher.batch_size', 'eval_batch_size'],
              'evaluate': ['eval_batch_size']}[config.mode]
    if config.mode == 'quantize' and config.teacher.checkpoint:
        fields.remove('teacher.batch_size')    # no teacher is trained
    if config.mode == 'quantize':   # each run's batch splits over its own devices
        fields.remove('batch_size')
        sweep.device_split(config, len(sweep.runs_of(config)), device_count)
    for field in fields:
        check_divisible(_get(config, field), device_count, field)


def check_divisible(batch_size: int, device_count: int, field: str = 'batch_size') -> None:
    """Raises ValueError unless the global batch splits evenly over the devices."""
    if batch_size % device_count:
        raise ValueError(
            f'{field}={batch_size} does not split over {device_count} devices: use a multiple of {device_count}.')

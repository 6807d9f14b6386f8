"""The one reading of a config: `parse(config) -> Experiment`, typed and checked.

A run's ml_collections ConfigDict is read here and nowhere else in bag_jax/: `parse` checks every
field the config's mode uses (a bad value raises ValueError naming the field, the value and what
is allowed, before anything is loaded or compiled) and returns frozen dataclasses that the rest of
the package reads:

    Experiment         mode, seed, eval_batch_size, data, teacher, dfq (quantize mode), checkpoint
                       (evaluate mode), and `record`, the config as JSON (workdir/config.json)
    DataSpec           where the images are (bag_jax.data.load_dataset reads it)
    TeacherSpec        the teacher's checkpoint and its full-precision training
    DFQSpec            a data-free quantization run: the method, `quant` (a QuantSpec), the
                       generator, the schedule, the float hyperparameters (`Hypers`), the
                       distillation's form and layers, and the runs (seeds x sweep points)
    Hypers             the float hyperparameters the training step reads: a pytree, each leaf a
                       number for one run, or an array with one entry per run under a sweep

`SWEEPABLE` (the fields a sweep may vary) is the list of Hypers' fields, so a hyperparameter the
step reads is sweepable by construction.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import math
import numbers
from typing import Any, Optional

import jax
import numpy as np

from bag_jax import data, quant
from bag_jax.methods import METHODS, POOL_METHODS
from bag_jax.pool import PoolSpec
from bag_jax.models.generator import CONDITIONINGS
from bag_jax.quant import QuantSpec
from bag_jax.sweep import Run

MODES = ('quantize', 'teacher', 'evaluate')
CHANNEL_ATTENTION_FORMS = ('energy', 'energy_mean', 'mean', 'softmax')
RANGE_CLIPS = ('none', 'lp')
CHANNEL_ATTENTION_LAYERS = ('branch', 'conv', 'unit_out', 'stage_out')
EPOCH_LOOPS = ('auto', 'scan', 'python')


def _config_field(name: str):
    return dataclasses.field(metadata={'config': name})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Hypers:
    """The float hyperparameters of the training step (docs/algorithms.md 4-6), each named after
    its config field (`config_field`). Every leaf is a Python float for one run (a constant of
    the compiled program) or, inside a sweep's program, that run's traced value."""
    bns: float = _config_field('loss.bns')
    temperature: float = _config_field('loss.temperature')
    kd: float = _config_field('loss.kd')
    alpha_ds: float = _config_field('loss.alpha_ds')
    alpha_as: float = _config_field('loss.alpha_as')
    lambda_l: float = _config_field('loss.lambda_l')
    lambda_u: float = _config_field('loss.lambda_u')
    balance: float = _config_field('loss.balance')
    channel_attention: float = _config_field('loss.channel_attention')
    selce: float = _config_field('loss.selce')
    selce_tau: float = _config_field('loss.selce_tau')
    cam: float = _config_field('loss.cam')
    perturbation: float = _config_field('loss.perturbation')
    perturbation_eps: float = _config_field('loss.perturbation_eps')
    generator_lr: float = _config_field('generator.lr')
    generator_b1: float = _config_field('generator.b1')
    generator_b2: float = _config_field('generator.b2')
    student_lr: float = _config_field('student.lr')
    student_momentum: float = _config_field('student.momentum')
    student_weight_decay: float = _config_field('student.weight_decay')
    lr_decay: float = _config_field('lr_decay')

    def with_values(self, values: dict[str, Any]) -> 'Hypers':
        """These hyperparameters with `values` ({config field: value}, e.g. one run's swept
        values, DFQState.hparams) in place of theirs."""
        return dataclasses.replace(self, **{ATTRIBUTE[field]: value for field, value in values.items()})


def config_field(attribute: str) -> str:
    """The dotted config field of a Hypers attribute ('student_lr' -> 'student.lr')."""
    return next(f.metadata['config'] for f in dataclasses.fields(Hypers) if f.name == attribute)


# The float hyperparameters the training step reads: each can take a different value in every run
# of one program.
SWEEPABLE = tuple(f.metadata['config'] for f in dataclasses.fields(Hypers))
ATTRIBUTE = {f.metadata['config']: f.name for f in dataclasses.fields(Hypers)}


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where the images are (docs/data.md); None: unset (evaluate mode: the checkpoint's record)."""
    name: Optional[str]
    npz_path: Optional[str] = None
    tfds_dir: Optional[str] = None
    imagefolder_dir: Optional[str] = None
    digits_test_fraction: Optional[float] = None
    image_size: Optional[int] = None

    def get(self, field: str, default=None):
        value = getattr(self, field, None)
        return default if value is None else value


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """The teacher: a checkpoint (directory or 'pytorchcv:NAME'), or one trained as these say."""
    checkpoint: Optional[str]
    depth: int
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    label_smoothing: float


@dataclasses.dataclass(frozen=True)
class GeneratorSpec:
    latent_dim: int
    quantize: bool                  # BAG: weights at the student's w_bits
    quantize_activations: bool      # also the LeakyReLU outputs at a_bits
    conditioning: str               # 'embedding' | 'batchnorm'


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Iterations, phases and milestones of a quantization run (docs/algorithms.md 5.1)."""
    batch_size: int
    epochs: int
    iters_per_epoch: int
    warmup_epochs: int
    calibration_epochs: int
    lr_milestones: tuple[int, ...]
    epoch_loop: str
    image_grid_every: int
    log_every: int


@dataclasses.dataclass(frozen=True)
class DFQSpec:
    """A data-free quantization program: K runs (seeds x sweep points) of one method."""
    method: str
    quant: QuantSpec                # the student's
    generator: GeneratorSpec
    schedule: Schedule
    hypers: Hypers                  # the config's values (a sweep's values: `swept_values`)
    nesterov: bool
    attention_form: str             # loss.channel_attention_form
    attention_layers: str           # loss.channel_attention_layers
    num_seeds: int
    sweep: tuple[tuple[str, tuple[float, ...]], ...]   # ((field, values), ...) in config order
    runs: tuple[Run, ...]
    data_parallel: Optional[int]
    perturbation_features: bool = True   # the perturbed student loss keeps the channel-attention term
    range_clip: str = 'none'             # 'lp': activation ranges by the L_p search when calibration ends
    range_clip_batches: int = 4          # generator batches whose activations that search sees
    pool: Optional[PoolSpec] = None      # the synthetic pool of a pool method (HAST, SynQ)

    @property
    def generator_quant(self) -> Optional[QuantSpec]:
        """The generator's QuantSpec: BAG's, the student's bit-widths where generator.quantize
        (weights) and generator.quantize_activations say; None when neither is on."""
        if not (self.generator.quantize or self.generator.quantize_activations):
            return None
        return dataclasses.replace(self.quant, w_bits=self.quant.w_bits if self.generator.quantize else None,
                                   a_bits=self.quant.a_bits if self.generator.quantize_activations else None)

    def swept_values(self) -> dict[str, np.ndarray]:
        """{field: float32 (K,)}: each run's value of every swept field ({} without a sweep, so
        that a single run's program keeps every hyperparameter a constant)."""
        return {field: np.asarray([dict(run.overrides)[field] for run in self.runs], np.float32)
                for field, _ in self.sweep}

    def attention_values(self) -> tuple[float, ...]:
        """loss.channel_attention in each sweep point (the config's value without a sweep)."""
        return self.values_of('loss.channel_attention')

    def values_of(self, field: str) -> tuple[float, ...]:
        """The values a Hypers field takes in the runs: its sweep values, or the config's value."""
        return dict(self.sweep).get(field, (getattr(self.hypers, ATTRIBUTE[field]),))

    def uses(self, field: str) -> bool:
        """Whether the loss weight `field` is above 0 in some run: its term is compiled in."""
        return max(self.values_of(field)) > 0


@dataclasses.dataclass(frozen=True)
class Experiment:
    mode: str                       # 'quantize' | 'teacher' | 'evaluate'
    seed: int
    eval_batch_size: int
    data: DataSpec
    teacher: Optional[TeacherSpec]  # quantize and teacher modes
    dfq: Optional[DFQSpec]          # quantize mode
    checkpoint: Optional[str]       # evaluate mode
    record: dict[str, Any]          # the config as JSON (workdir.claim records and compares it)


def parse(config) -> Experiment:
    """Checks every field the config's mode uses, and that no float field of any mode is nan or
    inf, and returns the typed Experiment; raises ValueError on the first bad value."""
    mode = _choice(config, 'mode', MODES)
    data_spec = _data(config, name_optional=mode == 'evaluate')
    teacher = _teacher(config) if mode in ('quantize', 'teacher') else None
    dfq = _dfq(config) if mode == 'quantize' else None
    checkpoint = None
    if mode == 'evaluate':
        checkpoint = _optional_str(config, 'checkpoint')
        if checkpoint is None:
            raise ValueError('checkpoint is unset: pass --config.checkpoint=DIR, a teacher or student checkpoint.')
    eval_batch_size = _int(config, 'eval_batch_size', 1)
    seed = _int(config, 'seed', 0) if mode != 'evaluate' else 0
    check_finite(config)
    return Experiment(mode=mode, seed=seed, eval_batch_size=eval_batch_size, data=data_spec, teacher=teacher,
                      dfq=dfq, checkpoint=checkpoint, record=json.loads(json.dumps(config.to_dict())))


def parse_data(config, name_optional: bool = False) -> DataSpec:
    """The `data` section alone, checked (the tools that read only data: export, bench)."""
    return _data(config, name_optional)


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


def check_finite(config) -> None:
    """Raises ValueError naming the first float field of `config` that is nan, inf or -inf (the
    sweep's values are checked with the sweep): such a value would only surface as a NaN after
    compilation and a first epoch."""
    for field, value in flat_fields(config.to_dict()).items():
        if field == 'sweep' or field.startswith('sweep.'):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f'{field}={value!r} is not allowed: use a finite number (nan, inf and -inf are '
                             'refused).')


def run_configs(config) -> list:
    """Each run of `config` as a config of its own (`--config.seed=s` with its overrides, no
    sweep): what the run trains as when it runs alone."""
    out = []
    for run in _runs(config, _sweep(config)):
        c = config.copy_and_resolve_references()
        with c.unlocked():
            c.sweep = None
            c.num_seeds = 1
            c.seed = run.seed
            for field, value in run.overrides:
                *path, last = field.split('.')
                node = c
                for part in path:
                    node = node[part]
                node[last] = value
        out.append(c)
    return out


def check_device_split(experiment: Experiment, device_count: int) -> None:
    """Raises ValueError unless every global batch the mode uses splits evenly over
    `device_count` devices (checked before anything is loaded)."""
    from bag_jax import sweep
    fields = {'eval_batch_size': experiment.eval_batch_size}
    if experiment.teacher is not None and not (experiment.mode == 'quantize' and experiment.teacher.checkpoint):
        fields['teacher.batch_size'] = experiment.teacher.batch_size
    if experiment.dfq is not None:   # each run's batch splits over its own devices
        dfq = experiment.dfq
        _, per_run = sweep.device_split(dfq.schedule.batch_size, dfq.data_parallel, len(dfq.runs), device_count)
        if dfq.pool is not None and dfq.pool.train_batch_size % per_run:
            raise ValueError(f'pool.train_batch_size={dfq.pool.train_batch_size} does not split over the {per_run} '
                             f'devices of each run: use a multiple of {per_run}.')
    order = {'quantize': ['eval_batch_size', 'teacher.batch_size'], 'teacher': ['teacher.batch_size', 'eval_batch_size'],
             'evaluate': ['eval_batch_size']}[experiment.mode]
    for field in order:
        if field in fields:
            check_divisible(fields[field], device_count, field)


def check_divisible(batch_size: int, device_count: int, field: str = 'batch_size') -> None:
    """Raises ValueError unless the global batch splits evenly over the devices."""
    if batch_size % device_count:
        raise ValueError(
            f'{field}={batch_size} does not split over {device_count} devices: use a multiple of {device_count}.')


# The sections, each read and checked once.

def _data(config, name_optional: bool) -> DataSpec:
    """The `data` section: the source name, its path fields and the ImageNet crop size; and that
    a teacher run (`mode='teacher'`) has training images."""
    if name_optional and _get(config, 'data.name') is None:
        name = None
    else:
        name = _choice(config, 'data.name', data.SOURCES)
    npz_path = _optional_str(config, 'data.npz_path')
    tfds_dir = _optional_str(config, 'data.tfds_dir')
    imagefolder_dir = _optional_str(config, 'data.imagefolder_dir') if 'imagefolder_dir' in config.data else None
    image_size = None
    # evaluate: unset means the checkpoint's recorded value (checkpoint.data_config_for).
    if 'image_size' in config.data and not (name_optional and config.data.image_size is None):
        image_size = _int(config, 'data.image_size', 1)
    # evaluate (name_optional): the checkpoint may record the path (checkpoint.data_config_for).
    if name == 'imagefolder' and imagefolder_dir is None and not name_optional:
        raise ValueError("data.name='imagefolder' needs data.imagefolder_dir: a folder with one subfolder of images "
                         'per class (ImageNet: val/n01440764/ILSVRC2012_val_00000293.JPEG, ...).')
    if name in data.STREAMING_SOURCES and config.get('mode') == 'teacher':
        raise ValueError(f'data.name={name!r} holds evaluation images only (no train split), so mode=teacher cannot '
                         'train on it: data-free quantization of an ImageNet model starts from a pretrained teacher '
                         '(teacher.checkpoint, e.g. pytorchcv:resnet18); training an ImageNet teacher is not supported.')
    fraction = None
    if 'digits_test_fraction' in config.data and not (name_optional and config.data.digits_test_fraction is None):
        fraction = _number(config, 'data.digits_test_fraction', strict=True, maximum=1.0)
        if fraction >= 1.0:
            raise ValueError(f'data.digits_test_fraction={fraction!r} is not allowed: use a fraction in (0, 1).')
    if name == 'npz' and npz_path is None and not name_optional:
        raise ValueError("data.name='npz' needs data.npz_path: the .npz file with x_train, y_train, x_test, y_test.")
    return DataSpec(name=name, npz_path=npz_path, tfds_dir=tfds_dir, imagefolder_dir=imagefolder_dir,
                    digits_test_fraction=fraction, image_size=image_size)


def _teacher(config) -> TeacherSpec:
    """The `teacher` section (architecture and full-precision training settings)."""
    from bag_jax import zoo
    from bag_jax.models.resnet_cifar import units_per_stage
    checkpoint = _optional_str(config, 'teacher.checkpoint')
    if zoo.is_zoo_spec(checkpoint):
        zoo.zoo_file(checkpoint)   # a known name, before anything is fetched
    depth = _get(config, 'teacher.depth')
    units_per_stage(depth)
    return TeacherSpec(checkpoint=checkpoint or None, depth=depth, epochs=_int(config, 'teacher.epochs', 1),
                       batch_size=_int(config, 'teacher.batch_size', 1), lr=_number(config, 'teacher.lr', strict=True),
                       momentum=_number(config, 'teacher.momentum', maximum=1.0),
                       weight_decay=_number(config, 'teacher.weight_decay'),
                       label_smoothing=_number(config, 'teacher.label_smoothing', maximum=1.0))


def _dfq(config) -> DFQSpec:
    """The fields of a data-free quantization run (method, bits, schedule, losses)."""
    method = _choice(config, 'method', METHODS)
    spec = QuantSpec(w_bits=quant.check_bits(_get(config, 'quant.w_bits'), 'quant.w_bits'),
                     a_bits=quant.check_bits(_get(config, 'quant.a_bits'), 'quant.a_bits'),
                     range_rule=_choice(config, 'quant.range_rule', quant.RANGE_RULES),
                     ste=_choice(config, 'quant.ste', quant.STE_MODES))
    _int(config, 'seed', 0)
    num_seeds = _int(config, 'num_seeds', 1)
    sweep = _sweep(config) if 'sweep' in config else {}
    if sweep:
        for run_config in run_configs(config):   # each swept value as the field allows it
            try:
                _dfq(run_config)
            except ValueError as e:
                raise ValueError(f'in a run of the sweep: {e}') from None
    data_parallel = None
    if config.get('data_parallel') is not None:
        data_parallel = _int(config, 'data_parallel', 1)
    batch_size = _int(config, 'batch_size', 2)   # the generator's batch statistics need two samples
    epochs = _int(config, 'epochs', 1)
    iters_per_epoch = _int(config, 'iters_per_epoch', 1)
    warmup_epochs = _int(config, 'warmup_epochs', 0, epochs)
    calibration_epochs = _int(config, 'calibration_epochs', 0, epochs)
    _int(config, 'eval_batch_size', 1)
    epoch_loop = _choice(config, 'epoch_loop', EPOCH_LOOPS)
    image_grid_every = _int(config, 'image_grid_every', 0)
    log_every = _int(config, 'log_every', 1)
    milestones = _get(config, 'lr_milestones')
    if not isinstance(milestones, (tuple, list)) or any(
            not isinstance(m, numbers.Integral) or m < 1 for m in milestones) or list(milestones) != sorted(milestones):
        raise ValueError(f'lr_milestones={milestones!r} is not allowed: use increasing positive epoch numbers, e.g. (100, 200, 300).')
    lr_decay = _number(config, 'lr_decay', strict=True, maximum=1.0)
    latent_dim = _int(config, 'generator.latent_dim', 1)
    generator_lr = _number(config, 'generator.lr', strict=True)
    b1 = _number(config, 'generator.b1', maximum=1.0)
    b2 = _number(config, 'generator.b2', maximum=1.0)
    for field in ('generator.quantize', 'generator.quantize_activations', 'student.nesterov'):
        if not isinstance(_get(config, field), bool):
            raise ValueError(f'{field}={_get(config, field)!r} is not allowed: use True or False.')
    student_lr = _number(config, 'student.lr', strict=True)
    momentum = _number(config, 'student.momentum', maximum=1.0)
    weight_decay = _number(config, 'student.weight_decay')
    weights = {field: _number(config, f'loss.{field}')
               for field in ('bns', 'kd', 'alpha_ds', 'alpha_as', 'balance', 'channel_attention', 'selce', 'cam',
                             'perturbation')}
    selce_tau = _number(config, 'loss.selce_tau', strict=True, maximum=1.0)
    perturbation_eps = _number(config, 'loss.perturbation_eps')
    if not isinstance(_get(config, 'loss.perturbation_features'), bool):
        raise ValueError(f"loss.perturbation_features={_get(config, 'loss.perturbation_features')!r} is not allowed: "
                         'use True or False.')
    range_clip = _choice(config, 'range_clip', RANGE_CLIPS)
    range_clip_batches = _int(config, 'range_clip_batches', 1)
    if range_clip != 'none' and calibration_epochs == 0:
        raise ValueError(f'range_clip={range_clip!r} clips the ranges when calibration ends, and '
                         'calibration_epochs=0 has none: use calibration_epochs of at least 1, or '
                         "range_clip='none'.")
    pool = _pool(config, method, warmup_epochs, calibration_epochs) if method in POOL_METHODS else None
    temperature = _number(config, 'loss.temperature', strict=True)
    lambda_l = _number(config, 'loss.lambda_l', maximum=1.0)
    lambda_u = _number(config, 'loss.lambda_u', maximum=1.0)
    if lambda_l > lambda_u:
        raise ValueError(f'loss.lambda_l={lambda_l} is above loss.lambda_u={lambda_u}: the margin needs lambda_l <= lambda_u.')
    form = _choice(config, 'loss.channel_attention_form', CHANNEL_ATTENTION_FORMS)
    layers = _choice(config, 'loss.channel_attention_layers', CHANNEL_ATTENTION_LAYERS)
    conditioning = _choice(config, 'generator.conditioning', CONDITIONINGS) if 'conditioning' in config.generator \
        else 'embedding'
    name = _get(config, 'data.name')
    if name in data.STREAMING_SOURCES and not _get(config, 'teacher.checkpoint'):
        raise ValueError(
            f"data.name={name!r} holds evaluation images only, so a quantization run cannot train its teacher: set "
            "teacher.checkpoint, e.g. --config.teacher.checkpoint=pytorchcv:resnet18 (or pytorchcv:resnet50, "
            "pytorchcv:mobilenetv2_w1: the zoo weights the papers used, fetched once), or a directory made by "
            "`python -m bag_jax.convert --pytorchcv FILE.pth --out DIR`.")
    hypers = Hypers(temperature=temperature, lambda_l=lambda_l, lambda_u=lambda_u, generator_lr=generator_lr,
                    generator_b1=b1, generator_b2=b2, student_lr=student_lr, student_momentum=momentum,
                    student_weight_decay=weight_decay, lr_decay=lr_decay, selce_tau=selce_tau,
                    perturbation_eps=perturbation_eps, **weights)
    return DFQSpec(
        method=method, quant=spec,
        generator=GeneratorSpec(latent_dim=latent_dim, quantize=config.generator.quantize,
                                quantize_activations=config.generator.quantize_activations,
                                conditioning=conditioning),
        schedule=Schedule(batch_size=batch_size, epochs=epochs, iters_per_epoch=iters_per_epoch,
                          warmup_epochs=warmup_epochs, calibration_epochs=calibration_epochs,
                          lr_milestones=tuple(int(m) for m in milestones), epoch_loop=epoch_loop,
                          image_grid_every=image_grid_every, log_every=log_every),
        hypers=hypers, nesterov=config.student.nesterov, attention_form=form, attention_layers=layers,
        num_seeds=num_seeds, sweep=tuple(sweep.items()), runs=tuple(_runs(config, sweep)),
        data_parallel=data_parallel, perturbation_features=config.loss.perturbation_features,
        range_clip=range_clip, range_clip_batches=range_clip_batches, pool=pool)


def _pool(config, method: str, warmup_epochs: int, calibration_epochs: int) -> PoolSpec:
    """The `pool` section of a pool method (bag_jax.pool): its sizes, optimisation and batches."""
    if warmup_epochs != calibration_epochs:
        raise ValueError(f'method={method!r} calibrates with the generator and then trains the student on its pool, '
                         f'so warmup_epochs ({warmup_epochs}) must equal calibration_epochs ({calibration_epochs}).')
    size = _int(config, 'pool.size', 2)
    batch_size = _int(config, 'pool.batch_size', 2)
    train_batch_size = _int(config, 'pool.train_batch_size', 1, size)
    low_pass = _number(config, 'pool.low_pass')
    return PoolSpec(size=size, batch_size=batch_size, steps=_int(config, 'pool.steps', 0),
                    lr=_number(config, 'pool.lr', strict=True), focal=_number(config, 'pool.focal'),
                    gamma=_number(config, 'pool.gamma'), train_batch_size=train_batch_size,
                    augment=_choice(config, 'pool.augment', data.AUGMENTATIONS), low_pass=low_pass)


# The sweep (bag_jax.sweep): config.sweep checked, and the runs it makes.

_DICT_HINT = ('a dict of dotted config fields to lists of values, e.g. '
              '--config.sweep=\'{"loss.channel_attention": [0, 5]}\'')


def _sweep(config) -> dict[str, tuple[float, ...]]:
    """config.sweep checked: {field: values} (empty without a sweep). Raises ValueError naming a
    field that cannot be swept (one that changes shapes or the program: bit-widths, method,
    batch size, depth, data, and every boolean field), a value that is not a finite number, or an
    empty value list.

    The sweep is a dict, or its JSON text: the command line's parser (Python literals) leaves
    `--config.sweep='{"generator.quantize": [true, false]}'` or `[0.1, NaN]` a string."""
    sweep = config.get('sweep')
    if isinstance(sweep, str):
        sweep = _parse_json(sweep)
    if sweep is None or (hasattr(sweep, '__len__') and len(sweep) == 0):
        return {}
    if not hasattr(sweep, 'items'):
        raise ValueError(f'sweep={sweep!r} is not allowed: use {_DICT_HINT}.')
    checked = {}
    for field, values in sweep.items():
        if field not in SWEEPABLE:
            raise ValueError(_unsweepable_message(config, field))
        if isinstance(values, (str, bytes)) or not hasattr(values, '__len__') or not len(values):
            raise ValueError(f'sweep[{field!r}]={values!r} is not allowed: use a non-empty list of numbers.')
        if any(isinstance(v, bool) for v in values):
            raise ValueError(f'sweep[{field!r}]={list(values)!r} is not allowed: every value must be a number '
                             f'(True and False are not; {field} is a float hyperparameter).')
        if any(not isinstance(v, numbers.Real) for v in values):
            raise ValueError(f'sweep[{field!r}]={list(values)!r} is not allowed: every value must be a number.')
        if any(not math.isfinite(v) for v in values):
            raise ValueError(f'sweep[{field!r}]={list(values)!r} is not allowed: every value must be a finite number '
                             '(nan, inf and -inf are refused).')
        if len(set(values)) != len(values):
            raise ValueError(f'sweep[{field!r}]={list(values)!r} repeats a value: each sweep point once '
                             '(num_seeds repeats runs).')
        checked[field] = tuple(float(v) for v in values)
    return checked


def _parse_json(text: str):
    """The sweep given as text: its JSON value (a dict, if it is right)."""
    try:
        return json.loads(text)
    except ValueError as e:
        raise ValueError(f'sweep={text!r} is not allowed: it is not a dict, and as JSON it does not parse ({e}): '
                         f'use {_DICT_HINT}.') from None


def _unsweepable_message(config, field: str) -> str:
    """Why `field` cannot be swept, and which fields can."""
    sweepable = (f'a sweep varies only the float hyperparameters of the step, which change no shape and no '
                 f'program: {", ".join(SWEEPABLE)}')
    try:
        value = _value(config, field)
    except (KeyError, AttributeError):
        return f'sweep field {field!r} cannot be swept (there is no such config field): {sweepable}.'
    if isinstance(value, bool):
        return (f'sweep field {field!r} cannot be swept: it is a boolean field, and True/False switches a part of '
                f'the program on or off, which one compilation cannot serve; run each value as a run of its own '
                f'(--config.{field}=True, --config.{field}=False in separate workdirs). {sweepable[0].upper()}'
                f'{sweepable[1:]}.')
    return (f'sweep field {field!r} cannot be swept: {sweepable}. Bit-widths, method, batch size, depth and data '
            'need runs of their own.')


def _runs(config, sweep: dict[str, tuple[float, ...]]) -> list[Run]:
    """Every sweep point (product of the sweep values, in order) times the seeds config.seed ..
    config.seed + num_seeds - 1, seeds innermost."""
    points = itertools.product(*sweep.values()) if sweep else [()]
    return [Run(overrides=tuple(zip(sweep, values)), seed=config.seed + s)
            for values in points for s in range(config.num_seeds)]


# Reading and checking one field.

def _value(config, field: str):
    node = config
    for part in field.split('.'):
        node = node[part]
    return node


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


def _choice(config, field: str, allowed: tuple[str, ...]) -> str:
    return quant.check_choice(_get(config, field), allowed, field)


def _optional_str(config, field: str) -> str | None:
    value = _get(config, field)
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f'{field}={value!r} is not allowed: use a non-empty path, or leave it unset.')
    return value

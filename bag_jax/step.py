"""One data-free quantization iteration and the state it carries (docs/algorithms.md 5.2, 5.3).

An iteration draws z and labels, generates a batch, takes one Adam step on the generator and one
SGD step on the quantized student on that same batch. It is generic over the methods
(bag_jax.methods: each gives its generator and student loss) and reads its float hyperparameters
from one `settings.Hypers`: the config's constants, with a sweep's per-run values
(`DFQState.hparams`) in place of theirs. How iterations are laid out on the devices (scanned
epochs, runs side by side) is bag_jax.layouts; the training loop is bag_jax.dfq.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bag_jax import data, losses, methods, models, parallel
from bag_jax.methods.base import Forwards, Method
from bag_jax.models import Generator, bn_input_pairs, unit_features
from bag_jax.models.resnet_cifar import unit_index
from bag_jax.settings import DFQSpec, Hypers

ADAM_EPS = 1e-8


@flax.struct.dataclass
class DFQState:
    """Everything the runs need to continue; each leaf has a leading run axis of size K."""
    step: jax.Array            # iterations done
    rng: jax.Array             # PRNGKey per seed
    gen_params: Any
    gen_opt_state: Any
    gen_quant_stats: Any       # {} unless generator.quantize_activations
    stu_params: Any
    stu_opt_state: Any
    stu_quant_stats: Any
    hparams: Any               # {config field: value} of the swept hyperparameters ({} without a sweep)


@dataclasses.dataclass(frozen=True)
class Setup:
    """The static side of a run: the networks, the method and the settings the step uses."""
    method: Method
    teacher: nn.Module         # any registered architecture (models.ARCHITECTURES)
    student: nn.Module         # the teacher's architecture, fake-quantized
    generator: Generator
    num_classes: int
    batch_size: int
    latent_dim: int
    iters_per_epoch: int
    warmup_epochs: int
    calibration_epochs: int
    lr_milestones: tuple[int, ...]
    nesterov: bool
    hypers: Hypers             # the config's values: constants unless swept
    attention_form: str
    attention_layers: str
    distill: bool              # channel attention on in some run: the networks sow their features

    def hypers_of(self, hparams) -> Hypers:
        """A run's hyperparameters: its traced values where a field is swept (`hparams`, one
        run's entries of DFQState.hparams), the config's constants otherwise."""
        return self.hypers.with_values(hparams)


def generator_optimizer(h: Hypers) -> optax.GradientTransformation:
    """PyTorch's Adam without the learning rate (applied in the step: it changes with the epoch)."""
    return optax.scale_by_adam(b1=h.generator_b1, b2=h.generator_b2, eps=ADAM_EPS)


def student_optimizer(h: Hypers, nesterov: bool) -> optax.GradientTransformation:
    """PyTorch's coupled-decay Nesterov SGD without the learning rate (docs/algorithms.md 5.1, pitfall 9.15)."""
    return optax.chain(optax.add_decayed_weights(h.student_weight_decay),
                       optax.trace(decay=h.student_momentum, nesterov=nesterov))


def build_setup(spec: DFQSpec, teacher_model: nn.Module, info: data.DatasetInfo) -> Setup:
    """The networks and the method that `spec` describes around `teacher_model`; the generator
    makes images of `info.image_shape`."""
    generator = Generator(num_classes=info.num_classes, image_shape=info.image_shape,
                          latent_dim=spec.generator.latent_dim, conditioning=spec.generator.conditioning,
                          quant=spec.generator_quant)
    s = spec.schedule
    return Setup(method=methods.get(spec.method), teacher=teacher_model,
                 student=models.quantized(teacher_model, spec.quant), generator=generator,
                 num_classes=info.num_classes, batch_size=s.batch_size, latent_dim=spec.generator.latent_dim,
                 iters_per_epoch=s.iters_per_epoch, warmup_epochs=s.warmup_epochs,
                 calibration_epochs=s.calibration_epochs, lr_milestones=s.lr_milestones, nesterov=spec.nesterov,
                 hypers=spec.hypers, attention_form=spec.attention_form, attention_layers=spec.attention_layers,
                 distill=max(spec.attention_values()) > 0)


def learning_rate(base: float, epoch, milestones: tuple[int, ...], decay: float):
    """base * decay^(milestones passed): `epoch + 1 > m` in the reference's LRPolicy (docs/algorithms.md 9.14)."""
    passed = sum((epoch >= m).astype(jnp.float32) for m in milestones) if milestones else 0.0
    return base * decay**passed


def init_state(setup: Setup, teacher_variables, seed, hparams=None) -> DFQState:
    """One run's initial state: a fresh generator, the student a copy of the teacher (docs/algorithms.md 1.1);
    `hparams` its swept values (default none)."""
    key = jax.random.PRNGKey(seed)
    gen_key, stu_key, rng = jax.random.split(key, 3)
    z = jnp.zeros((2, setup.latent_dim))
    y = jnp.zeros((2,), jnp.int32)
    gen_vars = setup.generator.init(gen_key, z, y)
    stu_vars = setup.student.init(stu_key, jnp.zeros((1,) + setup.generator.image_shape))
    stu_params = jax.tree.map(jnp.asarray, teacher_variables['params'])
    h = setup.hypers
    return DFQState(step=jnp.zeros((), jnp.int32), rng=rng,
                    gen_params=gen_vars['params'], gen_opt_state=generator_optimizer(h).init(gen_vars['params']),
                    gen_quant_stats=gen_vars.get('quant_stats', {}),
                    stu_params=stu_params, stu_opt_state=student_optimizer(h, setup.nesterov).init(stu_params),
                    stu_quant_stats=stu_vars.get('quant_stats', {}), hparams={} if hparams is None else hparams)


def init_states(setup: Setup, teacher_variables, first_seed: int, num_seeds: int, mesh,
                seeds=None, hparams=None) -> DFQState:
    """The initial states of K runs, stacked on a leading run axis sharded over the mesh's
    'runs' rows: seeds first_seed .. first_seed + num_seeds - 1, or the K `seeds` given, with
    the swept values `hparams` ({field: (K,)}, settings.DFQSpec.swept_values)."""
    seeds = first_seed + np.arange(num_seeds) if seeds is None else np.asarray(seeds)
    hparams = {k: jnp.asarray(v, jnp.float32) for k, v in (hparams or {}).items()}
    init_all = jax.vmap(lambda seed, hp: init_state(setup, teacher_variables, seed, hp))
    return jax.jit(init_all, out_shardings=parallel.runs_sharded(mesh))(jnp.asarray(seeds), hparams)


def distilled_features(collections, layers: str) -> list[jax.Array]:
    """The tensors channel attention compares, from a network's sown collections (docs/algorithms.md 8.2b):
    'branch' (each unit's conv branch), 'unit_out', 'stage_out' (last unit of each stage), 'conv'
    (every conv output, i.e. every BN input). Units are named `stage{S}_unit{U}` in every
    architecture (models.registry)."""
    if layers == 'conv':
        flat = flax.traverse_util.flatten_dict(collections['bn_inputs'])
        return [flat[k] for k in sorted(flat)]
    features = collections['features']
    if layers == 'branch':
        return unit_features(features, 'branch')
    if layers == 'unit_out':
        return unit_features(features, 'out')
    last = {}
    for stage, unit in map(unit_index, features):
        last[stage] = max(last.get(stage, 0), unit)
    return [features[f'stage{stage}_unit{unit}']['out'] for stage, unit in sorted(last.items())]


def _sown_collections(setup: Setup) -> list[str]:
    """The collections the networks sow for channel attention: 'features' or 'bn_inputs' or none."""
    if not setup.distill:
        return []
    return ['bn_inputs'] if setup.attention_layers == 'conv' else ['features']


@dataclasses.dataclass(frozen=True)
class Phase:
    """What an epoch's iterations do, fixed when its program is compiled (one program per phase,
    so no phase pays for another's work: no range reductions once the ranges are frozen, no
    student gradient during warm-up)."""
    calibrate: bool        # the activation ranges update: the first calibration_epochs
    train_student: bool    # the student steps: from warmup_epochs on

    @property
    def name(self) -> str:
        if self.calibrate:
            return 'calibration' + (' and fine-tuning' if self.train_student else '')
        return 'fine-tuning' if self.train_student else 'warm-up'


def phase_of(setup: Setup, epoch: int) -> Phase:
    """The phase of (0-based) `epoch`."""
    return Phase(calibrate=epoch < setup.calibration_epochs, train_student=epoch >= setup.warmup_epochs)


def train_iteration(setup: Setup, state: DFQState, teacher_variables, epoch, phase: Phase, data_sharding=None):
    """One iteration of `setup.method` for one run in `phase` (static); `epoch` (traced) sets the
    learning rates. Returns (state, metrics of scalars).

    The shared forwards are computed once: x = G(z, y), the teacher's logits and BN statistics
    on x and, where the method's generator loss reads them, the student's logits. The generator's
    gradient is assembled from their VJPs: G's, P's and (if it sees the student) Q's with respect
    to the images. Once the ranges are frozen, the student step runs on the same images with the
    same parameters and ranges, so it reuses that one student forward and takes the parameters'
    VJP from it. While they calibrate, the reference updates them in both forwards
    (docs/algorithms.md 5.2), so the student step runs its own forward on the updated ranges.
    """
    method, h = setup.method, setup.hypers_of(state.hparams)
    key = jax.random.fold_in(state.rng, state.step)
    z_key, y_key = jax.random.split(key)
    z = jax.random.normal(z_key, (setup.batch_size, setup.latent_dim))
    y = jax.random.randint(y_key, (setup.batch_size,), 0, setup.num_classes)
    if data_sharding is not None:
        z, y = jax.lax.with_sharding_constraint((z, y), data_sharding)
    sown = _sown_collections(setup)
    teacher_stats = teacher_variables['batch_stats']

    def generate(gen_params):
        x, col = setup.generator.apply({'params': gen_params, 'quant_stats': state.gen_quant_stats}, z, y,
                                       calibrate=phase.calibrate, mutable=['quant_stats'])
        return x, col.get('quant_stats', {})

    def teacher_forward(x):
        t, col = setup.teacher.apply(teacher_variables, x, mutable=sorted({'bn_inputs', *sown}))
        return (t, losses.bns_loss(bn_input_pairs(col['bn_inputs'], teacher_stats))), col

    def student_forward(params, x, quant_stats):
        s, col = setup.student.apply({'params': params, 'batch_stats': teacher_stats, 'quant_stats': quant_stats}, x,
                                     calibrate=phase.calibrate, mutable=['quant_stats', *sown])
        return (s, {c: col[c] for c in sown}), col['quant_stats']

    def generator_loss(t, bns, *s):
        return method.generator_loss(Forwards(labels=y, teacher_logits=t, bns=bns, student_logits=s[0] if s else None), h)

    # Generator step: through the teacher (and, where L_G reads it, the student's fake quantizers).
    x, generator_vjp, gen_quant_stats = jax.vjp(generate, state.gen_params, has_aux=True)
    (t, bns), teacher_vjp, t_col = jax.vjp(teacher_forward, x, has_aux=True)
    stu_quant_stats = state.stu_quant_stats
    if method.generator_sees_student:
        (s, s_col), student_vjp, stu_quant_stats = jax.vjp(
            lambda p, x: student_forward(p, x, state.stu_quant_stats), state.stu_params, x, has_aux=True)
        loss_g, (dt, dbns, ds) = jax.value_and_grad(generator_loss, argnums=(0, 1, 2))(t, bns, s)
        dx = teacher_vjp((dt, dbns))[0] + student_vjp((ds, jax.tree.map(jnp.zeros_like, s_col)))[1]
    else:
        loss_g, (dt, dbns) = jax.value_and_grad(generator_loss, argnums=(0, 1))(t, bns)
        dx = teacher_vjp((dt, dbns))[0]
    gen_grads, = generator_vjp(dx)
    gen_lr = learning_rate(h.generator_lr, epoch, setup.lr_milestones, h.lr_decay)
    gen_updates, gen_opt_state = generator_optimizer(h).update(gen_grads, state.gen_opt_state, state.gen_params)
    gen_params = optax.apply_updates(state.gen_params, jax.tree.map(lambda u: -gen_lr * u, gen_updates))

    # Student step on the same batch, detached, with the teacher's logits and features (docs/algorithms.md 9.10).
    if not method.generator_sees_student or phase.calibrate:
        (s, s_col), params_vjp, stu_quant_stats = jax.vjp(
            lambda p: student_forward(p, jax.lax.stop_gradient(x), stu_quant_stats), state.stu_params, has_aux=True)
    else:   # the generator step's forward: same images, parameters and (frozen) ranges
        params_vjp = functools.partial(lambda vjp, cotangent: vjp(cotangent)[:1], student_vjp)
    forwards = Forwards(labels=y, teacher_logits=t, bns=bns)

    def student_loss(s, s_col):
        ca = jnp.zeros(())
        if sown:   # BAG's channel-attention distillation (bag_jax.methods.bag), for any method
            ca = losses.channel_attention_loss(distilled_features(s_col, setup.attention_layers),
                                               distilled_features(t_col, setup.attention_layers),
                                               setup.attention_form)
        return method.student_loss(s, forwards, h) + h.channel_attention * ca, ca

    (loss_s, ca), cotangents = jax.value_and_grad(student_loss, argnums=(0, 1), has_aux=True)(s, s_col)
    stu_params, stu_opt_state = state.stu_params, state.stu_opt_state
    # The student's optimizer does not step during warm-up, so its momentum starts after it (9.14).
    if phase.train_student:
        stu_grads, = params_vjp(cotangents)
        stu_lr = learning_rate(h.student_lr, epoch, setup.lr_milestones, h.lr_decay)
        updates, stu_opt_state = student_optimizer(h, setup.nesterov).update(
            stu_grads, state.stu_opt_state, state.stu_params)
        stu_params = optax.apply_updates(state.stu_params, jax.tree.map(lambda u: -stu_lr * u, updates))
    new_state = DFQState(step=state.step + 1, rng=state.rng, gen_params=gen_params, gen_opt_state=gen_opt_state,
                         gen_quant_stats=gen_quant_stats, stu_params=stu_params, stu_opt_state=stu_opt_state,
                         stu_quant_stats=stu_quant_stats, hparams=state.hparams)
    step_metrics = {'loss_g': loss_g, 'loss_s': loss_s, 'bns': bns, 'channel_attention': ca,
                    'teacher_acc': jnp.mean(jnp.argmax(t, -1) == y),
                    'agreement': jnp.mean(jnp.argmax(s, -1) == jnp.argmax(t, -1))}
    return new_state, step_metrics


def student_variables(state: DFQState, teacher_variables) -> dict:
    """The students' variables (leading seed axis), BN statistics being the teacher's (docs/algorithms.md 2.5)."""
    return {'params': state.stu_params, 'quant_stats': state.stu_quant_stats,
            'batch_stats': teacher_variables['batch_stats']}

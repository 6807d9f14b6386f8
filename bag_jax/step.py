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
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bag_jax import data, losses, methods, models, parallel, pool, quant
from bag_jax.methods.base import Forwards, Method
from bag_jax.models import Generator, bn_input_pairs, unit_features
from bag_jax.models.resnet_cifar import unit_index
from bag_jax.settings import DFQSpec, Hypers

ADAM_EPS = 1e-8
LP_CLIP_STREAM = 0x1b   # the L_p search's generator batches: a stream of the run's key of its own


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
    pool: Any = dataclasses.field(default_factory=dict)   # {'images', 'labels'} of a pool method, else {}


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
    # The student terms beyond the method's loss, each compiled in where its weight is above 0 in
    # some run: selective cross-entropy, Grad-CAM alignment, the sign-gradient perturbation.
    selce: bool = False
    cam: bool = False
    perturbation: bool = False
    perturbation_features: bool = True   # the perturbed loss keeps the channel-attention term
    pool: Optional[pool.PoolSpec] = None   # a pool method's pool (bag_jax.pool)

    @property
    def extra_student_terms(self) -> bool:
        """Whether the student step is `student_update`'s (terms beyond the method's loss)."""
        return self.selce or self.cam or self.perturbation or self.pool is not None

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
                 distill=spec.uses('loss.channel_attention'), selce=spec.uses('loss.selce'),
                 cam=spec.uses('loss.cam'), perturbation=spec.uses('loss.perturbation'),
                 perturbation_features=spec.perturbation_features, pool=spec.pool)


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
                    stu_quant_stats=stu_vars.get('quant_stats', {}), hparams={} if hparams is None else hparams,
                    pool={} if setup.pool is None else pool.placeholder(setup.pool, setup.generator.image_shape))


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
    if setup.pool is not None and not phase.calibrate:
        return _pool_iteration(setup, state, teacher_variables, epoch, phase, data_sharding)
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

    if setup.extra_student_terms and phase.train_student:
        stu_params, stu_opt_state, stu_quant_stats, loss_s, ca, s = student_update(
            setup, h, state, teacher_variables, jax.lax.stop_gradient(x), y, stu_quant_stats, epoch, phase)
        new_state = dataclasses.replace(state, step=state.step + 1, gen_params=gen_params, gen_opt_state=gen_opt_state,
                                        gen_quant_stats=gen_quant_stats, stu_params=stu_params,
                                        stu_opt_state=stu_opt_state, stu_quant_stats=stu_quant_stats)
        return new_state, _step_metrics(loss_g, loss_s, bns, ca, t, s, y)

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
    new_state = dataclasses.replace(state, step=state.step + 1, gen_params=gen_params, gen_opt_state=gen_opt_state,
                                    gen_quant_stats=gen_quant_stats, stu_params=stu_params,
                                    stu_opt_state=stu_opt_state, stu_quant_stats=stu_quant_stats)
    return new_state, _step_metrics(loss_g, loss_s, bns, ca, t, s, y)


def _step_metrics(loss_g, loss_s, bns, ca, t, s, y) -> dict[str, jax.Array]:
    return {'loss_g': loss_g, 'loss_s': loss_s, 'bns': bns, 'channel_attention': ca,
            'teacher_acc': jnp.mean(jnp.argmax(t, -1) == y),
            'agreement': jnp.mean(jnp.argmax(s, -1) == jnp.argmax(t, -1))}


def _pool_iteration(setup: Setup, state: DFQState, teacher_variables, epoch, phase: Phase, data_sharding=None):
    """A pool method's iteration after calibration (bag_jax.methods.hast): no generator; the
    student steps on a batch of its run's pool (bag_jax.pool.sample_batch). The generator's
    loss and BN-statistics loss are reported as 0."""
    h = setup.hypers_of(state.hparams)
    x, y = pool.sample_batch(state.pool, jax.random.fold_in(state.rng, state.step), setup.pool)
    if data_sharding is not None:
        x, y = jax.lax.with_sharding_constraint((x, y), data_sharding)
    stu_params, stu_opt_state, stu_quant_stats, loss_s, ca, s, t = student_update(
        setup, h, state, teacher_variables, x, y, state.stu_quant_stats, epoch, phase, return_teacher=True)
    new_state = dataclasses.replace(state, step=state.step + 1, stu_params=stu_params, stu_opt_state=stu_opt_state,
                                    stu_quant_stats=stu_quant_stats)
    zero = jnp.zeros(())
    return new_state, _step_metrics(zero, loss_s, zero, ca, t, s, y)


def last_conv_path(bn_inputs) -> tuple[str, ...]:
    """The path of the network's last convolution output in its sown 'bn_inputs' (the call order
    of the modules, which the collection keeps): Grad-CAM's layer. SynQ takes the last Conv2d
    module PyTorch registers (src/gradcam.py:89-103), the same for the ResNets (a unit's identity
    conv, where it has one, after its body: ResNet-20's stage3_unit3/conv2). In pytorchcv's
    MobileNetV2 that module is the 1x1 classifier on the pooled 1x1 map, whose min-max
    normalized map is 0 (a CAM loss of 0); here its last ConvBlock, final_block, 7x7 at 224."""
    return max(flax.traverse_util.flatten_dict(bn_inputs), key=_network_order)


def _network_order(path: tuple[str, ...]):
    """A sort key of module paths in the order the networks call them (models.registry's names):
    the stem, then `stage{S}_unit{U}` by number (Flax keeps collections sorted by name, where
    unit10 would come before unit9), then the head's blocks ('final_block'); within a unit, by
    name (conv1 < conv2 < conv3 < identity_conv, the order pytorchcv registers them)."""
    top = path[0]
    if top.startswith('stage') and '_unit' in top:
        return (1, *unit_index(top), path[1:])
    return (2 if top.startswith('final') else 0, 0, 0, path[1:])


def grad_cam_inputs(apply_fn):
    """Runs `apply_fn(perturbations) -> (logits, collections)` (the collections holding
    'bn_inputs') and returns (logits, collections, F, g): F the last convolution's output and g
    the gradient of each sample's top-1 logit with respect to it, from the VJP of the network
    with respect to a zero perturbation of every convolution output (models.layers.ConvBlock).
    Only the part of the network above F enters g's computation once compiled."""
    shapes = jax.eval_shape(lambda: apply_fn(None)[1]['bn_inputs'])
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
    (logits, col), pullback = jax.vjp(apply_fn, zeros)
    grads, = pullback((losses.top1_cotangent(logits), jax.tree.map(jnp.zeros_like, col)))
    path = last_conv_path(col['bn_inputs'])
    flat_grads = flax.traverse_util.flatten_dict(grads)
    features = flax.traverse_util.flatten_dict(col['bn_inputs'])[path]
    return logits, col, features, jax.lax.stop_gradient(flat_grads[path])


def student_terms(setup: Setup, h: Hypers, teacher_variables, params, quant_stats, x, y, calibrate: bool,
                  clean: bool, selection_logits=None):
    """The student's loss on images `x` with every term the setup compiles in (docs/algorithms.md
    10): the method's loss, channel attention / feature alignment (`h.channel_attention`; on the
    perturbed images only where `setup.perturbation_features`), selective cross-entropy with the
    teacher's confidence on `selection_logits` (the clean images' logits; None: this call's) and,
    on clean images, Grad-CAM alignment of the last convolution. The teacher runs here, attached:
    the gradient with respect to `x` passes through it as in HAST. Returns (loss, (quant_stats,
    s, t, channel attention))."""
    method = setup.method
    teacher_stats = teacher_variables['batch_stats']
    use_ca = setup.distill and (clean or setup.perturbation_features)
    use_cam = setup.cam and clean
    cols = set(_sown_collections(setup) if use_ca else []) | ({'bn_inputs'} if use_cam else set())

    def teacher_apply(perturbations):
        extra = {} if perturbations is None else {'perturbations': perturbations}
        return setup.teacher.apply({**teacher_variables, **extra}, x, mutable=sorted(cols))

    def student_apply(perturbations):
        extra = {} if perturbations is None else {'perturbations': perturbations}
        return setup.student.apply({'params': params, 'batch_stats': teacher_stats, 'quant_stats': quant_stats,
                                    **extra}, x, calibrate=calibrate, mutable=['quant_stats', *sorted(cols)])

    cam = jnp.zeros(())
    if use_cam:
        t, t_col, f_t, g_t = grad_cam_inputs(teacher_apply)
        s, s_col, f_s, g_s = grad_cam_inputs(student_apply)
        size = x.shape[1:3]
        map_t = jax.lax.stop_gradient(losses.grad_cam_from_gradients(f_t, g_t, size))
        cam = jnp.mean(jnp.square(map_t - losses.grad_cam_from_gradients(f_s, g_s, size)))
    else:
        t, t_col = teacher_apply(None)
        s, s_col = student_apply(None)
    loss = method.student_loss(s, Forwards(labels=y, teacher_logits=t, bns=jnp.zeros(())), h)
    ca = jnp.zeros(())
    if use_ca:
        ca = losses.channel_attention_loss(distilled_features(s_col, setup.attention_layers),
                                           distilled_features(t_col, setup.attention_layers),
                                           setup.attention_form, detach_teacher=False)
        loss += h.channel_attention * ca
    if setup.selce:
        selection = t if selection_logits is None else selection_logits
        loss += h.selce * losses.selective_cross_entropy(s, selection, y, h.selce_tau)
    if use_cam:
        loss += h.cam * cam
    return loss, (s_col['quant_stats'], s, t, ca)


def student_update(setup: Setup, h: Hypers, state: DFQState, teacher_variables, x, y, quant_stats, epoch,
                   phase: Phase, return_teacher: bool = False):
    """The student's step on images `x` (constants) with the terms beyond the method's loss
    (`student_terms`): HAST's sign-gradient perturbation, where on, adds h.perturbation times the
    loss on x + eps sign(grad_x loss) (docs/algorithms.md 10.1), both gradients summed into one
    SGD step. Returns (params, optimizer state, quant_stats, loss, channel attention, s[, t])."""
    def clean(params, x):
        return student_terms(setup, h, teacher_variables, params, quant_stats, x, y, phase.calibrate, clean=True)

    if setup.perturbation:
        (loss, (stats, s, t, ca)), (grads, grad_x) = jax.value_and_grad(clean, argnums=(0, 1), has_aux=True)(
            state.stu_params, x)
        x_perturbed = losses.sign_step(x, grad_x, h.perturbation_eps)
        (loss_p, (stats, _, _, _)), grads_p = jax.value_and_grad(
            lambda p: student_terms(setup, h, teacher_variables, p, stats, x_perturbed, y, phase.calibrate,
                                    clean=False, selection_logits=t), has_aux=True)(state.stu_params)
        loss = loss + h.perturbation * loss_p
        grads = jax.tree.map(lambda a, b: a + h.perturbation * b, grads, grads_p)
    else:
        (loss, (stats, s, t, ca)), grads = jax.value_and_grad(clean, has_aux=True)(state.stu_params, x)
    stu_lr = learning_rate(h.student_lr, epoch, setup.lr_milestones, h.lr_decay)
    updates, opt_state = student_optimizer(h, setup.nesterov).update(grads, state.stu_opt_state, state.stu_params)
    params = optax.apply_updates(state.stu_params, jax.tree.map(lambda u: -stu_lr * u, updates))
    out = (params, opt_state, stats, loss, ca, s)
    return out + (t,) if return_teacher else out


def lp_clipped_ranges(setup: Setup, state: DFQState, teacher_variables, batches: int, a_bits: int):
    """One run's activation ranges after the L_p search (quant.lp_clip_range, docs/algorithms.md 10.3):
    `batches` generator batches (its frozen ranges, the run's own key) go through the student
    with its calibrated ranges; each QuantAct's inputs over all of them are the samples of its
    search. The searches run on one forward, so a range is chosen for the inputs that the
    calibrated ranges below it produce. Returns the new 'quant_stats' (x_min, x_max replaced)."""
    key = jax.random.fold_in(state.rng, LP_CLIP_STREAM)
    images = []
    for i in range(batches):
        z_key, y_key = jax.random.split(jax.random.fold_in(key, i))
        z = jax.random.normal(z_key, (setup.batch_size, setup.latent_dim))
        y = jax.random.randint(y_key, (setup.batch_size,), 0, setup.num_classes)
        images.append(setup.generator.apply({'params': state.gen_params, 'quant_stats': state.gen_quant_stats}, z, y))
    variables = {'params': state.stu_params, 'batch_stats': teacher_variables['batch_stats'],
                 'quant_stats': state.stu_quant_stats}
    _, col = setup.student.apply(variables, jnp.concatenate(images), mutable=['act_inputs'])
    stats = flax.traverse_util.flatten_dict(state.stu_quant_stats)
    for path, samples in flax.traverse_util.flatten_dict(col['act_inputs']).items():
        lo, hi = quant.lp_clip_range(samples, a_bits)
        stats[path[:-1] + ('x_min',)], stats[path[:-1] + ('x_max',)] = lo, hi
    return flax.traverse_util.unflatten_dict(stats)


def student_variables(state: DFQState, teacher_variables) -> dict:
    """The students' variables (leading seed axis), BN statistics being the teacher's (docs/algorithms.md 2.5)."""
    return {'params': state.stu_params, 'quant_stats': state.stu_quant_stats,
            'batch_stats': teacher_variables['batch_stats']}

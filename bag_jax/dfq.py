"""Data-free quantization training: GDFQ, AdaDFQ and BAG in one compiled, data-parallel step.

One iteration (docs/algorithms.md 5.2, 5.3) draws z and labels, generates a batch, takes one Adam step on the
generator and one SGD step on the quantized student on that same batch, all in one compiled
program with the batch sharded over a ('data',) mesh. On GPU and TPU a whole epoch of iterations
is one `lax.scan` inside that program (on CPU, see `make_train_epoch`). The epoch number is a
traced argument, so the program compiles once for the whole run: the calibration phase
(activation ranges update), the warm-up (the student does not step) and the learning-rate
milestones are all decided inside it.

Several runs train in the same program (`config.num_seeds`, `config.sweep`: bag_jax.sweep): K
independent generator/student pairs, every leaf of the training state with a leading run axis of
size K, sharded over the mesh's 'runs' axis. A sweep's values are per-run entries of the state
(`DFQState.hparams`), so the whole sweep compiles once.

Methods (`config.method`; each part of BAG switches off on its own):
  gdfq    L_G = CE(t, y) + 0.1 BNS;  L_Q = CE(s, y) + KD                   (docs/algorithms.md 4.2)
  adadfq  L_G = margin + beta L_bal + gamma BNS, through P and Q;  L_Q = -T^2 H   (docs/algorithms.md 4.3)
  bag     adadfq, generator quantized at the student's bits (generator.quantize), plus
          mu * channel-attention distillation in L_Q (loss.channel_attention)   (docs/algorithms.md 8.2)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from bag_jax import checkpoint, console, data, evaluate, losses, metrics, models, parallel, quant, report, sweep, teacher, validation
from bag_jax.models import Generator, bn_input_pairs, unit_features
from bag_jax.models.resnet_cifar import unit_index

DFQ_STATE_DIR = 'dfq_state'
IMAGES_DIR = metrics.IMAGES_DIR     # written by MetricWriter.write_image
ADAM_EPS = 1e-8
GRID_PER_CLASS = 8
# Above this many pixels per image (64x64) a run warns with its expected memory: the generator's
# first layer grows with the pixel count (docs/algorithms.md 3), 210M parameters at 512x512.
LARGE_IMAGE_PIXELS = 64 * 64
STUDENTS_DIR = 'students'   # one student per run of a multi-run program: students/<run name>/
RUNTIME_BYTES = 1e9    # the peak memory of a CIFAR-sized run beyond its arrays, measured on CPU


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
    hparams: Any               # {field: value} of the swept hyperparameters ({} without a sweep)


@dataclasses.dataclass(frozen=True)
class Setup:
    """The static side of a run: networks, optimizers and the values of the config the step uses."""
    method: str
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
    loss: Any                  # a frozen copy of config.loss
    hyper: Any                 # {field: config value} of sweep.SWEEPABLE: constants unless swept
    distill: bool              # channel attention on in some run: the networks sow their features

    def reader(self, hparams) -> Callable[[str], Any]:
        """field -> its value in a run: the run's traced value where the field is swept
        (`hparams`, one run's entries of DFQState.hparams), the config's constant otherwise."""
        return lambda field: hparams[field] if field in hparams else self.hyper[field]


def generator_optimizer(h: Callable[[str], Any]) -> optax.GradientTransformation:
    """PyTorch's Adam without the learning rate (applied in the step: it changes with the epoch)."""
    return optax.scale_by_adam(b1=h('generator.b1'), b2=h('generator.b2'), eps=ADAM_EPS)


def student_optimizer(h: Callable[[str], Any], nesterov: bool) -> optax.GradientTransformation:
    """PyTorch's coupled-decay Nesterov SGD without the learning rate (docs/algorithms.md 5.1, pitfall 9.15)."""
    return optax.chain(optax.add_decayed_weights(h('student.weight_decay')),
                       optax.trace(decay=h('student.momentum'), nesterov=nesterov))


def build_setup(config, teacher_model: nn.Module, info: data.DatasetInfo) -> Setup:
    """Builds the networks and optimizers that `config` describes around `teacher_model`; the
    generator makes images of `info.image_shape`."""
    q = config.quant
    w_bits = quant.check_bits(q.w_bits, 'quant.w_bits')
    a_bits = quant.check_bits(q.a_bits, 'quant.a_bits')
    student = models.quantized(teacher_model, w_bits, a_bits, range_rule=q.range_rule, ste=q.ste)
    generator = Generator(num_classes=info.num_classes, image_shape=info.image_shape,
                          latent_dim=config.generator.latent_dim,
                          w_bits=w_bits if config.generator.quantize else None,
                          a_bits=a_bits if config.generator.quantize_activations else None,
                          range_rule=q.range_rule, ste=q.ste, conditioning=config.generator.conditioning)
    hyper = {field: float(sweep.config_value(config, field)) for field in sweep.SWEEPABLE}
    attention = sweep.sweep_of(config).get('loss.channel_attention', (hyper['loss.channel_attention'],))
    return Setup(method=config.method, teacher=teacher_model, student=student, generator=generator,
                 num_classes=info.num_classes, batch_size=config.batch_size, latent_dim=config.generator.latent_dim,
                 iters_per_epoch=config.iters_per_epoch, warmup_epochs=config.warmup_epochs,
                 calibration_epochs=config.calibration_epochs, lr_milestones=tuple(config.lr_milestones),
                 nesterov=config.student.nesterov, loss=flax.core.FrozenDict(config.loss.to_dict()),
                 hyper=flax.core.FrozenDict(hyper), distill=max(attention) > 0)


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
    h = setup.reader({})
    return DFQState(step=jnp.zeros((), jnp.int32), rng=rng,
                    gen_params=gen_vars['params'], gen_opt_state=generator_optimizer(h).init(gen_vars['params']),
                    gen_quant_stats=gen_vars.get('quant_stats', {}),
                    stu_params=stu_params, stu_opt_state=student_optimizer(h, setup.nesterov).init(stu_params),
                    stu_quant_stats=stu_vars.get('quant_stats', {}), hparams={} if hparams is None else hparams)


def init_states(setup: Setup, teacher_variables, first_seed: int, num_seeds: int, mesh,
                seeds=None, hparams=None) -> DFQState:
    """The initial states of K runs, stacked on a leading run axis sharded over the mesh's
    'runs' rows: seeds first_seed .. first_seed + num_seeds - 1, or the K `seeds` given, with
    the swept values `hparams` ({field: (K,)}, bag_jax.sweep.hyperparameters)."""
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
    return ['bn_inputs'] if setup.loss['channel_attention_layers'] == 'conv' else ['features']


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
    """One GDFQ/AdaDFQ/BAG iteration for one seed in `phase` (static); `epoch` (traced) sets the
    learning rates. Returns (state, metrics of scalars).

    The generator's gradient is assembled from the pieces' VJPs: G's, P's (teacher logits and BN
    statistics) and, for AdaDFQ/BAG, Q's (the student's logits) with respect to the images. Once
    the ranges are frozen, the student step runs on the same images with the same parameters and
    ranges, so it reuses that one student forward and takes the parameters' VJP from it. While
    they calibrate, the reference updates them in both forwards (docs/algorithms.md 5.2), so the student step
    runs its own forward on the updated ranges.
    """
    L, h = setup.loss, setup.reader(state.hparams)
    key = jax.random.fold_in(state.rng, state.step)
    z_key, y_key = jax.random.split(key)
    z = jax.random.normal(z_key, (setup.batch_size, setup.latent_dim))
    y = jax.random.randint(y_key, (setup.batch_size,), 0, setup.num_classes)
    if data_sharding is not None:
        z, y = jax.lax.with_sharding_constraint((z, y), data_sharding)
    sown = _sown_collections(setup)
    layers = L['channel_attention_layers']
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

    # Generator step: through the teacher (and, for AdaDFQ/BAG, the student's fake quantizers).
    x, generator_vjp, gen_quant_stats = jax.vjp(generate, state.gen_params, has_aux=True)
    (t, bns), teacher_vjp, t_col = jax.vjp(teacher_forward, x, has_aux=True)
    stu_quant_stats = state.stu_quant_stats
    if setup.method == 'gdfq':
        loss_g, (dt, dbns) = jax.value_and_grad(
            lambda t, bns: losses.gdfq_generator_loss(t, y, bns, h('loss.bns')), argnums=(0, 1))(t, bns)
        dx = teacher_vjp((dt, dbns))[0]
    else:
        (s, s_col), student_vjp, stu_quant_stats = jax.vjp(
            lambda p, x: student_forward(p, x, state.stu_quant_stats), state.stu_params, x, has_aux=True)
        loss_g, (dt, dbns, ds) = jax.value_and_grad(
            lambda t, bns, s: losses.adadfq_generator_loss(
                t, s, y, bns, lambda_l=h('loss.lambda_l'), lambda_u=h('loss.lambda_u'), alpha_ds=h('loss.alpha_ds'),
                alpha_as=h('loss.alpha_as'), balance=h('loss.balance'), bns_weight=h('loss.bns')),
            argnums=(0, 1, 2))(t, bns, s)
        dx = teacher_vjp((dt, dbns))[0] + student_vjp((ds, jax.tree.map(jnp.zeros_like, s_col)))[1]
    gen_grads, = generator_vjp(dx)
    gen_lr = learning_rate(h('generator.lr'), epoch, setup.lr_milestones, h('lr_decay'))
    gen_updates, gen_opt_state = generator_optimizer(h).update(gen_grads, state.gen_opt_state, state.gen_params)
    gen_params = optax.apply_updates(state.gen_params, jax.tree.map(lambda u: -gen_lr * u, gen_updates))

    # Student step on the same batch, detached, with the teacher's logits and features (docs/algorithms.md 9.10).
    if setup.method == 'gdfq' or phase.calibrate:
        (s, s_col), params_vjp, stu_quant_stats = jax.vjp(
            lambda p: student_forward(p, jax.lax.stop_gradient(x), stu_quant_stats), state.stu_params, has_aux=True)
    else:   # the generator step's forward: same images, parameters and (frozen) ranges
        params_vjp = functools.partial(lambda vjp, cotangent: vjp(cotangent)[:1], student_vjp)

    def student_loss(s, s_col):
        if setup.method == 'gdfq':
            loss = losses.gdfq_student_loss(s, t, y, h('loss.temperature'), h('loss.kd'))
        else:
            loss = losses.adadfq_student_loss(s, t, h('loss.temperature'))
        ca = jnp.zeros(())
        if sown:
            ca = losses.channel_attention_loss(distilled_features(s_col, layers), distilled_features(t_col, layers),
                                               L['channel_attention_form'])
        return loss + h('loss.channel_attention') * ca, ca

    (loss_s, ca), cotangents = jax.value_and_grad(student_loss, argnums=(0, 1), has_aux=True)(s, s_col)
    stu_params, stu_opt_state = state.stu_params, state.stu_opt_state
    # The student's optimizer does not step during warm-up, so its momentum starts after it (9.14).
    if phase.train_student:
        stu_grads, = params_vjp(cotangents)
        stu_lr = learning_rate(h('student.lr'), epoch, setup.lr_milestones, h('lr_decay'))
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


def make_train_epoch(setup: Setup, mesh, num_seeds: int, loop: str = 'auto') -> Callable:
    """Compiles one epoch of K = `num_seeds` runs: (state, teacher_variables, epoch) -> (state, metrics).

    The metrics are epoch means, each of shape (K,); the state's buffers are donated. Each phase
    (`phase_of(epoch)`: calibration, warm-up, fine-tuning) has a program of its own, compiled the
    first time an epoch of that phase runs; the epoch itself is a traced argument, so the
    learning-rate milestones do not recompile.
    `loop='scan'` runs the iterations in a `lax.scan` inside one program, vmapped over the runs.
    `loop='python'` compiles one iteration and calls it `iters_per_epoch` times. XLA:CPU runs
    convolutions inside a while loop 10-70x slower than the same convolutions outside one, and
    vmapped ones several times slower than separate calls (bench/NOTES.md), so 'auto' takes
    'python' on CPU and 'scan' on GPU and TPU; the Python loop never vmaps over runs.
    With several rows on the mesh's 'runs' axis (`parallel.make_mesh(runs=R)`), the program is a
    `shard_map` over 'runs': each row of devices computes its K / R runs, each run's batch split
    over the row's 'data' devices by the compiler, so runs on different devices execute the plain
    single-run computation. `epoch_fn.programs()` counts the programs traced so far (at most one
    per phase); `epoch_fn.program(phase)` is the jitted program of a phase.
    """
    if loop == 'auto':
        loop = 'python' if mesh.devices.flat[0].platform == 'cpu' else 'scan'
    rows = parallel.num_runs_axis(mesh)
    if num_seeds % rows:
        raise ValueError(f'{num_seeds} runs do not spread evenly over the {rows} rows of the mesh.')
    local = num_seeds // rows             # runs per row of devices
    repl, by_run = parallel.replicated(mesh), parallel.runs_sharded(mesh)
    traced = []    # one entry per trace of a compiled function, i.e. per program

    def counted(fn):
        def wrapped(*args):
            traced.append(None)
            return fn(*args)
        return wrapped

    def over_runs(fn, vectorize: bool):
        """fn of one run -> fn of a state with a leading run axis: vmapped (`vectorize`) or each
        run computed on its own, one after the other, in the same program."""
        if local == 1:
            return _with_run_axis(fn)
        if vectorize:
            return jax.vmap(fn, in_axes=(0, None, None))

        def each(state, *args):
            outs = [fn(jax.tree.map(lambda a: a[k], state), *args) for k in range(local)]
            return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
        return each

    def on_mesh(fn):
        """fn of the runs of one row -> the jitted program of all K runs on the mesh."""
        if rows > 1:
            fn = jax.shard_map(fn, mesh=mesh, in_specs=(P(parallel.RUNS_AXIS), P(), P()),
                               out_specs=P(parallel.RUNS_AXIS), axis_names={parallel.RUNS_AXIS})
        return jax.jit(counted(fn), donate_argnums=(0,), out_shardings=(by_run, repl))

    @functools.cache
    def program(phase: Phase):
        def iteration(state, teacher_variables, epoch):
            # Inside shard_map the data axis is the row's: its sharding is the abstract mesh's.
            data_sharding = (parallel.batch_sharded(mesh) if rows == 1 else
                             NamedSharding(jax.sharding.get_abstract_mesh(), P(parallel.DATA_AXIS)))
            return train_iteration(setup, state, teacher_variables, epoch, phase, data_sharding)

        if loop == 'scan':
            def one_run(state, teacher_variables, epoch):
                state, per_iteration = jax.lax.scan(lambda carry, _: iteration(carry, teacher_variables, epoch),
                                                    state, None, length=setup.iters_per_epoch)
                return state, jax.tree.map(jnp.mean, per_iteration)
            return on_mesh(over_runs(one_run, vectorize=True))
        if rows == 1 and local > 1:
            # Runs sharing the devices: one run per call (see the Python loop below).
            return jax.jit(counted(iteration), donate_argnums=(0,), out_shardings=(repl, repl))
        # One run per row keeps its run axis through the program (a free reshape there), so no
        # epoch slices and restacks the ~300 arrays of the state on the host.
        return on_mesh(over_runs(iteration, vectorize=False))

    def epoch_fn(state, teacher_variables, epoch, on_iteration: Callable[[int], None] | None = None):
        """`on_iteration(n)`, if given, hears of every n iterations done (progress; the scanned
        epoch reports all of them at its end)."""
        on_iteration = on_iteration or (lambda n: None)
        compiled = program(phase_of(setup, int(epoch)))
        if loop == 'scan':
            out = compiled(state, teacher_variables, epoch)
            on_iteration(setup.iters_per_epoch)
            return out
        if rows > 1 or local == 1:
            per_iteration = []
            for _ in range(setup.iters_per_epoch):
                state, step_metrics = compiled(state, teacher_variables, epoch)
                per_iteration.append(step_metrics)
                on_iteration(1)
            return state, jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs), axis=0), *per_iteration)
        # Runs sharing one row, one per call: vmapping over them turns XLA:CPU's convolutions
        # into grouped ones with batched kernels, which it runs far slower than K separate calls
        # (bench/NOTES.md). The runs do not depend on each other, so without a wait two of these
        # calls would execute at once; on several CPU devices their all-reduces then wait for
        # each other's threads until XLA aborts (a rendezvous timeout), so each call finishes
        # before the next starts.
        runs = [jax.tree.map(lambda a: a[k], state) for k in range(num_seeds)]
        per_iteration = [[] for _ in runs]
        for _ in range(setup.iters_per_epoch):
            for k in range(num_seeds):
                runs[k], step_metrics = compiled(runs[k], teacher_variables, epoch)
                if mesh.devices.size > 1:
                    jax.block_until_ready(step_metrics)
                per_iteration[k].append(step_metrics)
            on_iteration(1)
        epoch_metrics = [jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *m) for m in per_iteration]
        stack = lambda *xs: jnp.stack(xs)
        return jax.device_put(jax.tree.map(stack, *runs), by_run), jax.tree.map(stack, *epoch_metrics)

    def iteration_flops(state, teacher_variables, epoch) -> float:
        """XLA's count of the floating-point operations of one iteration of all K runs in the
        phase of `epoch`, summed over the devices (each device's compiled program counted once
        per call; a scanned epoch's loop body is counted once, as XLA counts it)."""
        one_per_call = loop == 'python' and rows == 1 and local > 1
        args = (jax.tree.map(lambda a: a[0], state) if one_per_call else state, teacher_variables, epoch)
        cost = program(phase_of(setup, int(epoch))).lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost['flops']) * mesh.devices.size * (num_seeds if one_per_call else 1)

    epoch_fn.programs = lambda: len(traced)
    epoch_fn.program = program
    epoch_fn.iteration_flops = iteration_flops
    epoch_fn.loop = loop
    return epoch_fn


def _with_run_axis(fn):
    """Runs a one-run function on a state with a leading run axis of size 1 (no vmap needed)."""
    def wrapped(state, *args):
        out = fn(jax.tree.map(lambda a: a[0], state), *args)
        return jax.tree.map(lambda a: a[None], out)
    return wrapped


def student_variables(state: DFQState, teacher_variables) -> dict:
    """The students' variables (leading seed axis), BN statistics being the teacher's (docs/algorithms.md 2.5)."""
    return {'params': state.stu_params, 'quant_stats': state.stu_quant_stats,
            'batch_stats': teacher_variables['batch_stats']}


def make_student_eval_step(setup: Setup, info: data.DatasetInfo, mesh) -> Callable:
    """Eval step over all runs' students at once: counts of shape (K,). The test images are split
    over every device (as each process reads them: its own share) and the students gathered to
    every device, so runs sharded over the mesh's 'runs' rows are scored like replicated ones."""
    def apply_all(variables, images):
        per_run = {k: v for k, v in variables.items() if k != 'batch_stats'}
        per_run = jax.lax.with_sharding_constraint(per_run, parallel.replicated(mesh))
        return jax.vmap(lambda v: setup.student.apply({**v, 'batch_stats': variables['batch_stats']}, images))(per_run)
    return evaluate.make_eval_step(apply_all, info, mesh)


def make_image_grid(setup: Setup, seed: int, chunk: int) -> Callable:
    """Compiles the image grid of the first seed's generator: state -> uint8 (rows, cols, 3).

    One row of `GRID_PER_CLASS` images for each of the first `metrics.GRID_CLASSES` classes, from
    fixed latents (the same every epoch). The generator runs on at most `chunk` images at a
    time (the generator normalizes with its batch's statistics, so each call is a batch of
    equal size, the largest divisor of the image count up to `chunk`).
    """
    shown = min(setup.num_classes, metrics.GRID_CLASSES)
    y = jnp.repeat(jnp.arange(shown), GRID_PER_CLASS)
    z = jax.random.normal(jax.random.PRNGKey(seed + 10_000), (len(y), setup.latent_dim))
    size = max(d for d in range(1, min(chunk, len(y)) + 1) if len(y) % d == 0)

    @jax.jit
    def generate(state, z, y):
        variables = {'params': jax.tree.map(lambda a: a[0], state.gen_params),
                     'quant_stats': jax.tree.map(lambda a: a[0], state.gen_quant_stats)}
        return setup.generator.apply(variables, z, y)

    def grid(state) -> np.ndarray:
        images = np.concatenate([np.asarray(generate(state, z[i:i + size], y[i:i + size]))
                                 for i in range(0, len(y), size)])
        return metrics.image_grid(images, np.asarray(y), setup.num_classes, per_class=GRID_PER_CLASS)
    return grid


def warn_about_memory(setup: Setup, info: data.DatasetInfo) -> float | None:
    """Logs a warning with the expected memory of one training iteration when the images are
    larger than `LARGE_IMAGE_PIXELS`; returns that estimate in bytes (None for small images).

    The estimate (float32) counts the generator's parameters four times (value, gradient, Adam's
    two moments), the student's three times (value, gradient, momentum) and the teacher's once,
    every module output of the generator and of two ResNets once per image of the batch, and
    `RUNTIME_BYTES` for JAX itself. With the CIFAR ResNet it is 1.07-1.27x the peak memory
    measured on CPU for 32x32 to 256x256 RGB images at batch 16 (an overestimate since the
    generator's convolutions became sub-pixel ones); with ResNet-18 at 224x224 0.94x
    (bench/NOTES.md).
    """
    height, width, _ = info.image_shape
    if height * width <= LARGE_IMAGE_PIXELS:
        return None
    key = jax.random.PRNGKey(0)
    z, y = jnp.zeros((1, setup.latent_dim)), jnp.zeros((1,), jnp.int32)
    x = jnp.zeros((1,) + info.image_shape)
    count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))

    def sizes(module, *inputs):
        """(parameters, activations per example) of `module`, from shapes alone."""
        variables = jax.eval_shape(lambda: module.init(key, *inputs))
        _, captured = jax.eval_shape(lambda v: module.apply(v, *inputs, capture_intermediates=True,
                                                            mutable=['intermediates']), variables)
        return count(variables['params']), count(captured)

    gen_params, gen_acts = sizes(setup.generator, z, y)
    net_params, net_acts = sizes(setup.teacher, x)
    floats = 4 * gen_params + 4 * net_params + setup.batch_size * (gen_acts + 2 * net_acts)
    estimate = 4.0 * floats + RUNTIME_BYTES
    logging.warning('%dx%d images are larger than %d pixels: one training iteration at batch %d needs about '
                    '%.1f GB of memory per seed (the generator alone has %.1fM parameters). Lower batch_size, or '
                    'use smaller images, if that does not fit.', height, width, LARGE_IMAGE_PIXELS,
                    setup.batch_size, estimate / 1e9, gen_params / 1e6)
    return estimate


def load_teacher_for(config, workdir: str, dataset: data.ArrayDataset):
    """The teacher (trained first if needed) and its description, checked against the data."""
    directory = teacher.ensure_teacher(config, workdir, dataset)
    model, variables, meta = checkpoint.load_teacher(directory)
    info = data.DatasetInfo.from_dict(meta['data'])
    checkpoint.check_compatible(info, dataset.info, 'teacher.checkpoint')
    # The teacher's classes and normalization at the data's image size: ImageNet-style data
    # choose it (data.image_size), and every architecture pools globally.
    return model, variables, meta, dataclasses.replace(info, image_shape=dataset.info.image_shape)


def runs_and_mesh(config) -> tuple[list[sweep.Run], Any]:
    """The config's runs (seeds x sweep points, bag_jax.sweep) and the ('runs', 'data') mesh of
    every device they train on; ValueError naming the field when they do not split over it."""
    runs = sweep.runs_of(config)
    rows, _ = sweep.device_split(config, len(runs), jax.device_count())
    return runs, parallel.make_mesh(runs=rows)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
    """Runs data-free quantization as `config` says: one run, or the K runs of its seeds and
    sweep (bag_jax.sweep) in one program. Returns the summary written to
    `workdir/summary.json` (accuracies in percent; each run's, and each sweep point's mean and
    std over its seeds)."""
    validation.validate_config(config)
    devices = jax.device_count()
    runs, mesh = runs_and_mesh(config)
    K = len(runs)
    validation.check_divisible(config.eval_batch_size, devices, 'eval_batch_size')
    dataset = data.load_dataset(config.data)
    teacher_model, teacher_host, teacher_meta, info = load_teacher_for(config, workdir, dataset)
    setup = build_setup(config, teacher_model, info)
    if K > 1:
        logging.info('%d runs (%s) on a %s (runs x data) mesh', K, ', '.join(r.name for r in runs),
                     ' x '.join(map(str, mesh.devices.shape)))
    teacher_variables = parallel.replicate(teacher_host, mesh)

    # The teacher's own top-1, measured here on the same test split.
    teacher_eval = evaluate.make_eval_step(lambda v, x: teacher_model.apply(v, x), info, mesh)
    teacher_top1 = evaluate.evaluate(teacher_eval, teacher_variables, dataset, mesh, config.eval_batch_size)['top1']

    warn_about_memory(setup, info)
    state = init_states(setup, teacher_host, config.seed, K, mesh, seeds=[r.seed for r in runs],
                        hparams=sweep.hyperparameters(config))
    train_epoch = make_train_epoch(setup, mesh, K, config.epoch_loop)
    eval_step = make_student_eval_step(setup, info, mesh)
    image_grid = make_image_grid(setup, config.seed, config.eval_batch_size)

    # diverged[k]: the epoch (1-based) in which run k's losses stopped being finite, or None.
    history = {'top1': [], 'top5': [], 'diverged': [None] * K}
    ptq_top1, wall_s, start = None, 0.0, 0
    with checkpoint.TrainingCheckpoints(os.path.join(workdir, DFQ_STATE_DIR)) as ckpts, \
            metrics.MetricWriter(workdir) as writer:
        restored = ckpts.restore(state)
        if restored is not None:
            start, state, meta = restored
            history, ptq_top1, wall_s = meta['history'], meta['ptq_top1'], meta['wall_s']
            history.setdefault('diverged', [None] * K)
            if start > config.epochs:
                raise ValueError(f'epochs={config.epochs} is fewer than the {start} epochs that the run in {workdir} '
                                 f'has finished: use epochs={start} or more to extend it, or a new --workdir.')
            logging.info('quantization: resuming after epoch %d of %d', start, config.epochs)
        writer.resume(config.method, start)
        iters = config.iters_per_epoch
        with console.Progress(config.epochs * iters, initial=start * iters, desc=config.method,
                              unit='iteration', images_per_step=config.batch_size * K,
                              enabled=jax.process_index() == 0) as progress:
            compiled_phases = set()
            for epoch in range(start, config.epochs):
                t0 = time.time()
                phase = phase_of(setup, epoch)
                if phase not in compiled_phases:
                    compiled_phases.add(phase)
                    logging.info('epoch %d: compiling the %s program (once per run; XLA on CPU may take minutes, a '
                                 'cached program loads in seconds)', epoch + 1, phase.name)
                state, epoch_metrics = train_epoch(state, teacher_variables, jnp.int32(epoch), progress.update)
                epoch_metrics = {k: np.atleast_1d(np.asarray(v)) for k, v in parallel.to_host(epoch_metrics).items()}
                live = _check_finite(epoch_metrics, history['diverged'], runs, epoch, ckpts.latest_epoch(),
                                     os.path.join(workdir, DFQ_STATE_DIR))
                result = evaluate.evaluate(eval_step, student_variables(state, teacher_variables), dataset, mesh,
                                           config.eval_batch_size)
                top1, top5 = np.atleast_1d(result['top1']).tolist(), np.atleast_1d(result['top5']).tolist()
                history['top1'].append(top1)
                history['top5'].append(top5)
                if epoch == config.warmup_epochs - 1:
                    ptq_top1 = top1     # calibrated, not yet fine-tuned
                wall_s += time.time() - t0
                scalars = {k: float(v[live].mean()) for k, v in epoch_metrics.items()}    # of the runs still finite
                # The student does not step during warm-up: its rate is 0 there.
                lr_student = learning_rate(config.student.lr, jnp.int32(epoch), setup.lr_milestones, config.lr_decay)
                scalars.update(top1=float(np.mean(np.asarray(top1)[live])), top5=float(np.mean(np.asarray(top5)[live])),
                               lr_student=float(lr_student) if epoch >= config.warmup_epochs else 0.0,
                               epoch_s=time.time() - t0)
                if K > 1:     # each run's accuracies, under its name
                    scalars.update({f'{name}/{run.name}': value[k] for name, value in (('top1', top1), ('top5', top5))
                                    for k, run in enumerate(runs)})
                if epoch % config.log_every == 0 or epoch == config.epochs - 1:
                    writer.write(epoch + 1, scalars, phase=config.method)
                progress.set_postfix(epoch=epoch + 1, loss_g=f'{scalars["loss_g"]:.3f}',
                                     loss_s=f'{scalars["loss_s"]:.3f}', top1=f'{scalars["top1"]:.2f}')
                if config.image_grid_every and (epoch % config.image_grid_every == 0 or epoch == config.epochs - 1):
                    # The generator's parameters live on every process's devices: all run it, process 0 writes.
                    grid = image_grid(state)
                    if jax.process_index() == 0:     # images/epoch_NNNN.png and TensorBoard, rows labelled
                        labels = metrics.row_labels(info.num_classes, metrics.class_names(info))
                        writer.write_image(epoch + 1, metrics.readable_grid(grid, info.image_shape[:2], labels),
                                           phase=config.method)
                ckpts.save(epoch + 1, state, {'epoch': epoch + 1, 'history': history, 'ptq_top1': ptq_top1,
                                              'wall_s': wall_s})

    host_state = parallel.to_host(state)
    for k, run in enumerate(runs):
        directory = os.path.join(workdir, 'student' if K == 1 else os.path.join(STUDENTS_DIR, run.name))
        # Kept when a finished run starts again; rewritten when a run is extended.
        if _student_epochs(directory) != config.epochs:
            variables = {'params': jax.tree.map(lambda a: a[k], host_state.stu_params),
                         'quant_stats': jax.tree.map(lambda a: a[k], host_state.stu_quant_stats),
                         'batch_stats': teacher_host['batch_stats']}
            meta = checkpoint.model_meta(
                info, teacher_model, source=f'{config.method} from {teacher_meta["source"]}', data_config=config.data,
                quant={'w_bits': setup.student.w_bits, 'a_bits': setup.student.a_bits,
                       'range_rule': config.quant.range_rule, 'ste': config.quant.ste},
                top1=history['top1'][-1][k], epochs=config.epochs, seed=run.seed, overrides=dict(run.overrides),
                diverged_epoch=history['diverged'][k])
            checkpoint.save_model(directory, variables, meta, 'student')
    summary = make_summary(config, runs, history, ptq_top1, teacher_top1, wall_s, devices)
    metrics.write_summary(workdir, summary)
    if jax.process_index() == 0:
        print(report.format_summary(summary), flush=True)
    return summary


def _check_finite(epoch_metrics: dict[str, np.ndarray], diverged: list, runs: list[sweep.Run], epoch: int,
                  last_checkpoint: int | None, state_dir: str) -> np.ndarray:
    """Marks in `diverged` the runs whose losses stopped being finite in `epoch` (0-based) and
    returns the indices of the runs still finite. A single run stops there, as does a program
    whose every run has diverged (FloatingPointError naming the loss and the last good
    checkpoint); among several, a diverged run is logged and left behind, and the others go on."""
    finite = np.all([np.isfinite(v) for v in epoch_metrics.values()], axis=0)
    for k in np.flatnonzero(~finite):
        if diverged[k] is None:
            diverged[k] = epoch + 1
            if len(runs) > 1:
                bad = [name for name, v in epoch_metrics.items() if not np.isfinite(v[k])]
                logging.warning('run %s diverged in epoch %d (%s not finite): it is left behind, the other runs go on; '
                                'its results count the epochs before.', runs[k].name, epoch + 1, ', '.join(bad))
    live = np.asarray([k for k, d in enumerate(diverged) if d is None], int)
    if not len(live):
        name, values = next((n, v) for n, v in epoch_metrics.items() if not np.all(np.isfinite(v)))
        raise FloatingPointError(
            f'epoch {epoch + 1}: {name} is {values.tolist()} (not finite). Stopped; the last good checkpoint '
            f'({"none yet" if last_checkpoint is None else f"after epoch {last_checkpoint}"}) is kept in '
            f'{state_dir}. Lower generator.lr/student.lr or check the teacher.')
    return live


def _student_epochs(directory: str) -> int | None:
    """The epochs the student checkpoint in `directory` was trained for (None: none there)."""
    if not checkpoint.is_model_checkpoint(directory, 'student'):
        return None
    with open(os.path.join(directory, checkpoint.STUDENT_META)) as f:
        return json.load(f).get('epochs')


def make_summary(config, runs: list[sweep.Run], history, ptq_top1, teacher_top1, wall_s, devices) -> dict[str, Any]:
    """The summary from the per-epoch accuracies (history['top1'][epoch][run], percent): `runs`
    (each run's) and `groups` (each sweep point's mean and std over its seeds, bag_jax.sweep);
    without a sweep, also the accuracies at the top level (with several seeds: mean and std over
    those that did not diverge, and a `per_seed` table)."""
    results = sweep.run_results(runs, history['top1'], ptq_top1, history.get('diverged'), config.warmup_epochs)
    groups = sweep.groups_of(results)
    summary = {
        'method': config.method, 'w_bits': config.quant.w_bits, 'a_bits': config.quant.a_bits,
        'teacher_top1': teacher_top1,
    }
    swept = sweep.sweep_of(config)
    keys = ('ptq_top1', 'best_top1', 'best_epoch', 'last_top1')
    if not swept:
        if len(runs) == 1:
            summary.update({key: results[0][key] for key in keys})
        else:
            summary.update({key: groups[0][key] for key in keys if key != 'best_epoch'})
            summary['best_epoch'] = [r['best_epoch'] for r in results]
    summary.update({
        'epochs': config.epochs, 'iterations': config.epochs * config.iters_per_epoch,
        'batch_size': config.batch_size, 'num_seeds': config.num_seeds, 'num_runs': len(runs),
        'sweep': {field: list(values) for field, values in swept.items()},
        'wall_s': wall_s, 'devices': devices,
        'runs': results, 'groups': groups,
        'note': 'best_top1 is the best epoch on the test split (how the papers report); last_top1 is the final epoch',
    })
    if not swept and len(runs) > 1:
        summary['per_seed'] = {key: [r[key] for r in results] for key in ('seed', *keys, 'diverged_epoch')}
    return summary

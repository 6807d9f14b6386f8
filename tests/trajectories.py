"""How the tests compare two computations that should agree (another mesh, other processes,
seeds vmapped or not, another CPU), so that they hold on any CPU.

Float results differ in their last bits between meshes (the order of the cross-device sums),
processes (gloo's all-reduce) and CPUs (AVX-512, AVX2, ARM's NEON: vector width changes the
order of a reduction). Training amplifies that, so the tests compare three kinds of things:

  * exactly, what rounding cannot change: the data order, counts, epochs, which files exist;
  * to rounding (`ONE_STEP_SPREAD`), one step from the same state: losses, gradients, updates
    (`QUANTIZED_ONE_STEP_SPREAD` where the step's inputs differ in their last bits already);
    Not the generator's parameters: Adam's first step moves every weight by about lr whatever
    its gradient's size, so a gradient that is zero up to rounding (a bias before a BatchNorm)
    becomes a step of random sign. Adam's first moment after one step, 0.5 g, is compared
    instead;
  * one quantized step whose inputs already differ in their last bits (other processes: gloo
    sums the BN statistics in another order) only where its inputs bound it: an activation on a
    quantization boundary can step a level and move the losses and gradients by far more than
    rounding (the W8A8 fine-tuning step on 2 processes against 1 once differed by 15 % of the
    generator's gradient). Its ranges within a level, the attention loss against its terms, the
    batch fractions; the DFQ step's losses and gradients are compared to rounding on the same
    step without quantizers (tests/multiprocess_worker.py: float_config);
  * whole runs within the spread measured across CPUs and layouts (`WHOLE_RUN_*`).

The measurement (bench/NOTES.md, "The same run on another CPU", bench/trajectory_spread.py):
the tiny teacher's 42 SGD steps and 6 DFQ iterations (BAG at 3 and 8 bits, GDFQ at 3 bits), on
1, 2 and 4 devices of one process with XLA's AVX-512 (this machine's default), AVX2, AVX and
SSE4.2 code: 12 trajectories of each, and 2 processes x 2 devices for the teacher. One step from
the same state agreed to 1.4e-6 of each array's largest magnitude (the tests' one-step checks
compare gradients against the largest element of the whole gradient, as a bias before a
BatchNorm has a gradient that is all rounding). The teacher stayed within 1e-6 for a few steps,
then a knife-edge sent the layouts apart (at step 4 for some pairs, step 11 for the 2-process
run), reaching 8.1 % of an array's largest magnitude after 42 steps. Every teacher scored the
same 93.11 %; the 8-bit students differed by up to 2.44 points (11 of 450 test images); after 6
iterations the students' weights differed by up to 6.5e-4 and their activation ranges by 1.3e-2
of the largest. The bounds below are 2x to 70x those spreads.
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

ONE_STEP_SPREAD = 1e-4                # of each array's largest magnitude (measured 1.4e-6)
WHOLE_RUN_PARAMETER_SPREAD = 0.25     # teacher training, 42 steps (measured 0.081)
WHOLE_RUN_STUDENT_SPREAD = 1e-2       # student weights, a few iterations (measured 6.5e-4)
WHOLE_RUN_RANGE_SPREAD = 5e-2         # student activation ranges (measured 1.3e-2)
WHOLE_RUN_ACCURACY_SPREAD = 5.0       # percentage points, 22 of the 450 test digits (measured 2.44)
# One step whose inputs already differ in their last bits: a state initialized on another CPU (a
# recorded fixture), or batch statistics all-reduced in another order (gloo, across processes).
# An activation that sits on a quantization boundary can then step to the next level, which moves
# the loss itself. BAG's calibration step recorded on AVX-512 and recomputed under SSE4.2
# differed by 1.9e-4 of the generator gradient's largest element (AVX2: within 1e-4); the W8A8
# calibration step on 2 processes x 2 devices against 1 x 4 by 1.9e-4 (loss_g by 7.9e-5: a
# forward difference, though each device computes the same shapes), 3.1e-5 before the
# generator's convolutions became sub-pixel ones (the same function, other last bits).
QUANTIZED_ONE_STEP_SPREAD = 2e-3
# AdaDFQ's (and BAG's) student loss, -T^2 H(softmax((t - s) / T)), starts at its maximum (the
# entropy of the uniform distribution: -921 for T = 20 and 10 classes), so its gradient is a
# small difference of terms of size T |log p| per logit: the student's gradient of one step
# without quantizers, against the largest element of the whole gradient, differed by 5.9e-4
# between 4 devices and 1 (the scanned and the Python loop) and between 2 processes
# x 2 devices and 1 x 4 by 5.7e-4, where the generator's gradient of the same step agreed to 2.2e-6.
CANCELLING_GRADIENT_SPREAD = 5e-3


def flat(tree) -> dict[str, np.ndarray]:
    """A pytree of arrays as {'a/b': numpy array} (arrays split over processes gathered: every
    process calls it together)."""
    from bag_jax import parallel
    return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(parallel.to_host(tree), sep='/').items()}


def assert_rounding_close(a: dict, b: dict, tol: float, what: str = '', per_array: bool = True) -> None:
    """Every array of `a` (arrays by name) equals `b`'s up to noise: max |a - b| <= tol * scale,
    the scale being max |b| of each array, or with `per_array=False` of all of them (for
    gradients: the rounding noise of a gradient element is set by the size of the terms summed
    into it, and the gradient of a bias before a BatchNorm is all noise). The noise of a sum is
    absolute, so an element that is zero up to rounding fits no relative tolerance."""
    assert a.keys() == b.keys(), (what, sorted(a.keys() ^ b.keys()))
    magnitude = lambda name: float(np.abs(np.asarray(b[name], np.float64)).max(initial=0.0))
    overall = max((magnitude(name) for name in b), default=0.0)
    for name in a:
        x, y = np.asarray(a[name], np.float64), np.asarray(b[name], np.float64)
        scale = max(magnitude(name) if per_array else overall, 1e-30)
        worst = float(np.abs(x - y).max(initial=0.0))
        assert worst <= tol * scale, (f'{what}{name}: differs by {worst:.3g}, {worst / scale:.3g} of the largest '
                                      f'magnitude {scale:.3g} (allowed {tol:g})')


def float_config(c):
    """The ConfigDict `c` without quantizers (W32A32: neither the student nor BAG's generator
    quantized): the same DFQ step, program and all-reduces, with nothing that can step a level."""
    c = c.copy_and_resolve_references()
    c.quant.w_bits = 32
    c.quant.a_bits = 32
    return c


# The metrics of a quantized calibration iteration that its inputs bound, when they differ in
# their last bits (`assert_layouts_close`).
BOUNDED_METRICS = ('/channel_attention', '/agreement', '/teacher_acc', '/bns')


def bounded_by_inputs(quantized: dict) -> dict:
    """Of a quantized one-step result (`dfq_one_step`), what its inputs bound: the calibration
    iteration's activation ranges (within a level), attention loss (by its terms), batch
    fractions and the teacher's BN-statistics loss on the generated images."""
    return {k: v for k, v in quantized.items()
            if k.startswith('calibrate/') and ('/ranges/' in k or k.endswith(BOUNDED_METRICS))}


def assert_layouts_close(quantized: tuple[dict, dict], floating: tuple[dict, dict], batch_size: int, a_bits: int,
                         what: str = '') -> None:
    """The same DFQ step on two layouts (meshes, processes, runs vmapped or alone), by design: the
    layouts sum the batch statistics in other orders, so the quantized step's inputs differ in
    their last bits and an activation on a quantization boundary can step a level, which moves
    its losses and gradients by more than rounding. So the quantized step (`dfq_one_step`,
    calibration alone suffices) is compared where its inputs bound it (`bounded_by_inputs`, to
    QUANTIZED_ONE_STEP_SPREAD), and the losses and gradients of both phases on the same step
    without quantizers (`float_config`, the student `FLOAT_STUDENT_NOISE` off the teacher) to
    rounding; there the student's gradient of AdaDFQ's loss, a cancellation near its maximum,
    within CANCELLING_GRADIENT_SPREAD of the whole gradient."""
    (qa, qb), (fa, fb) = quantized, floating
    bounded = bounded_by_inputs(qb)
    assert len(bounded) > 4 and any('/ranges/' in k for k in bounded), sorted(qb)
    assert_one_step_close(bounded_by_inputs(qa), bounded, batch_size, what + 'quantized step: ',
                          tol=QUANTIZED_ONE_STEP_SPREAD, a_bits=a_bits)
    student = 'finetune/student_gradient/'
    part = lambda d, inside: {k: v for k, v in d.items() if k.startswith(student) == inside}
    assert part(fb, True) and part(fb, False), sorted(fb)
    assert_rounding_close(part(fa, True), part(fb, True), CANCELLING_GRADIENT_SPREAD, what + 'float step: ',
                          per_array=False)
    assert_one_step_close(part(fa, False), part(fb, False), batch_size, what + 'float step: ')


# How far the float step's student starts from the teacher (`dfq_one_step`'s student_noise):
# without quantizers the student is the teacher's copy, where AdaDFQ's and BAG's generator losses
# sit on their kinks (|p_s - p_t| at 0): two layouts whose student and teacher forwards differ in
# their last bits (runs vmapped or alone) then took other branches (loss_g 1.378 against 1.166).
FLOAT_STUDENT_NOISE = 0.05


def perturbed(params, scale: float):
    """`params` (a leading run axis) plus Gaussian noise of `scale` times each array's standard
    deviation, the same noise for every run, on the arrays' own shardings."""
    def perturb(tree):
        leaves, treedef = jax.tree.flatten(tree)
        keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
        return jax.tree.unflatten(treedef, [x + scale * jnp.std(x) * jax.random.normal(k, x.shape[1:], x.dtype)
                                            for x, k in zip(leaves, keys)])
    return jax.jit(perturb, out_shardings=jax.tree.map(lambda a: a.sharding, params))(params)


def dfq_one_step(setup, teacher_variables, mesh, first_seed: int = 0, num_seeds: int = 1,
                 loop: str = 'python', seeds=None, hparams=None, finetune: bool = True,
                 student_noise: float = 0.0) -> dict[str, np.ndarray]:
    """One DFQ iteration of each phase from the initial states of seeds first_seed.. (or of the
    runs of `seeds` and swept `hparams`, as step.init_states takes them) on `mesh`, with the epoch
    loop `loop` (every process calls it together). Arrays have a leading run axis.

      calibrate/...   one iteration of the calibration epoch: metrics, the generator's gradient
                      (as Adam's first moment) and the student's activation ranges
      finetune/...    one iteration after warm-up, from the initial states with those ranges:
                      metrics, the generator's gradient and the student's (`sgd_gradient`);
                      left out with `finetune=False`

    `student_noise`: the student starts `perturbed` by that much from the teacher's copy.
    """
    from bag_jax import layouts, parallel, step
    setup = dataclasses.replace(setup, iters_per_epoch=1)
    teacher_variables = parallel.replicate(teacher_variables, mesh)
    num_seeds = num_seeds if seeds is None else len(seeds)
    epoch_fn = layouts.make_train_epoch(setup, mesh, num_seeds, loop)
    initial = step.init_states(setup, teacher_variables, first_seed, num_seeds, mesh, seeds=seeds, hparams=hparams)
    if student_noise:
        initial = initial.replace(stu_params=perturbed(initial.stu_params, student_noise))
    calibrated, m = epoch_fn(jax.tree.map(jnp.copy, initial), teacher_variables, jnp.int32(0))
    out = {}
    out.update({f'calibrate/metrics/{k}': v for k, v in flat(m).items()})
    out.update({f'calibrate/generator_gradient/{k}': v for k, v in flat(calibrated.gen_opt_state.mu).items()})
    out.update({f'calibrate/ranges/{k}': v for k, v in flat(calibrated.stu_quant_stats).items()})
    if not finetune:
        return out
    start = initial.replace(stu_quant_stats=calibrated.stu_quant_stats)
    tuned, m = epoch_fn(start, teacher_variables, jnp.int32(max(setup.warmup_epochs, setup.calibration_epochs)))
    out.update({f'finetune/metrics/{k}': v for k, v in flat(m).items()})
    out.update({f'finetune/generator_gradient/{k}': v for k, v in flat(tuned.gen_opt_state.mu).items()})
    out.update({f'finetune/student_gradient/{k}': v for k, v in flat(sgd_gradient(tuned.stu_opt_state)).items()})
    return out


def sgd_gradient(opt_state):
    """The gradient (plus weight decay) of the first step, from an SGD state after one step:
    the momentum trace then holds it alone. Read there rather than as the difference of the
    parameters, which float32 resolves only to the parameters' last bit."""
    return optax.tree_utils.tree_get(opt_state, 'trace')


def quantization_level(x_min, x_max, a_bits: int):
    """One step of the activation grid of a quantizer with range [x_min, x_max] at `a_bits`
    (bag_jax.quant: 2^bits levels over the range)."""
    return (np.asarray(x_max, np.float64) - np.asarray(x_min, np.float64)) / (2.0**a_bits - 1.0)


def assert_ranges_close(a: dict, b: dict, tol: float, a_bits: int, what: str = '') -> None:
    """Activation ranges (`.../x_min`, `.../x_max`, `.../beta_t` by quantizer) of two layouts.

    A range is the extreme of activations that passed through earlier quantizers: an input on a
    level boundary that rounds the other way moves it by about one level of the grid, whatever
    the range's own size (a range near 0 would fit no relative bound). So each end may differ by
    `tol` of the quantizer's larger end plus one quantization level of its range; `beta_t`, a
    count, exactly."""
    assert a.keys() == b.keys(), (what, sorted(a.keys() ^ b.keys()))
    quantizers = {name.rsplit('/', 1)[0] for name in b}
    for q in sorted(quantizers):
        lo, hi = np.asarray(b[f'{q}/x_min'], np.float64), np.asarray(b[f'{q}/x_max'], np.float64)
        scale = np.maximum(np.abs(lo), np.abs(hi))
        allowed = tol * scale + np.abs(quantization_level(lo, hi, a_bits))
        for end in ('x_min', 'x_max'):
            worst = np.abs(np.asarray(a[f'{q}/{end}'], np.float64) - np.asarray(b[f'{q}/{end}'], np.float64))
            assert np.all(worst <= allowed), (f'{what}{q}/{end}: differs by {worst.max():.3g}, allowed {tol:g} of '
                                              f'the range plus one {a_bits}-bit level: {allowed.min():.3g}')
        if f'{q}/beta_t' in b:
            np.testing.assert_array_equal(a[f'{q}/beta_t'], b[f'{q}/beta_t'], err_msg=what + q)


# The attention loss is ||A_s - A_t||^2 of L2-normalized channel-attention vectors (the default
# 'energy' form), summed over layers: a small difference of terms of size ||A_s||^2 + ||A_t||^2 = 2
# per layer, and its rounding is that of those terms, not of the difference.
ATTENTION_TERM_SCALE = 2.0


def assert_one_step_close(a: dict, b: dict, batch_size: int, what: str = '', tol: float = ONE_STEP_SPREAD, *,
                          a_bits: int | None = None) -> None:
    """Compares two one-step results (`dfq_one_step`, tests/multiprocess_worker.py), each
    quantity against the size of what it is computed from, never of itself alone where a
    cancellation or a quantizer can make it small:

      * batch fractions (accuracy, teacher accuracy on the generated images, teacher-student
        agreement): within one sample of `batch_size`;
      * gradients: to `tol` of the largest element of the whole gradient;
      * activation ranges: `assert_ranges_close` (one quantization level of `a_bits`, required
        when ranges are compared);
      * the channel-attention loss: to `tol` of ATTENTION_TERM_SCALE;
      * BN running means: to `tol` of the layer's largest running standard deviation (a mean near
        0 is a cancellation of activations of that size);
      * the rest (losses, BN variances, teacher metrics): to `tol` of each array's magnitude.
    """
    assert set(a) == set(b), (what, sorted(set(a) ^ set(b)))
    groups: dict[str, dict[str, tuple]] = {}
    ranges: dict[str, dict[str, np.ndarray]] = {}
    for name in a:
        parts = name.split('/')
        if name.endswith(('/teacher_acc', '/agreement', '/accuracy')):
            np.testing.assert_allclose(a[name], b[name], atol=1.0 / batch_size + 1e-6, err_msg=what + name)
        elif parts[1] == 'ranges':
            prefix = '/'.join(parts[:2])
            ranges.setdefault(prefix, {})[name] = (a[name], b[name])
        elif parts[1].endswith(('gradient', 'update')):
            groups.setdefault('/'.join(parts[:2]), {})[name] = (a[name], b[name])
        elif name.endswith('/channel_attention'):
            scale = max(float(np.abs(b[name]).max(initial=0.0)), ATTENTION_TERM_SCALE)
            worst = float(np.abs(np.asarray(a[name], np.float64) - np.asarray(b[name], np.float64)).max(initial=0.0))
            assert worst <= tol * scale, f'{what}{name}: differs by {worst:.3g} (allowed {tol:g} of {scale:g})'
        elif parts[1] == 'batch_stats' and name.endswith('/mean') and name[:-4] + 'var' in b:
            scale = float(np.sqrt(np.abs(np.asarray(b[name[:-4] + 'var'], np.float64))).max(initial=0.0))
            scale = max(scale, float(np.abs(b[name]).max(initial=0.0)), 1e-30)
            worst = float(np.abs(np.asarray(a[name], np.float64) - np.asarray(b[name], np.float64)).max(initial=0.0))
            assert worst <= tol * scale, (f'{what}{name}: differs by {worst:.3g}, {worst / scale:.3g} of the '
                                          f'largest running standard deviation {scale:.3g} (allowed {tol:g})')
        else:
            groups.setdefault(name, {})[name] = (a[name], b[name])
    for group, arrays in groups.items():
        assert_rounding_close({n: x for n, (x, _) in arrays.items()}, {n: y for n, (_, y) in arrays.items()},
                              tol, what, per_array=len(arrays) == 1)
    for prefix, arrays in ranges.items():
        assert a_bits is not None, f'{what}{prefix}: ranges are compared within a quantization level: pass a_bits'
        assert_ranges_close({n: x for n, (x, _) in arrays.items()}, {n: y for n, (_, y) in arrays.items()},
                            tol, a_bits, what)

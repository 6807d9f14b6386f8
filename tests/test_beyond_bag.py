"""HAST, SynQ and the BAG combination (docs/algorithms.md 10) in the step and the loop: the
Grad-CAM gradient at the last convolution, the pool, the resized crop, the L_p range clip, the
perturbation's composition, the configs, and the three presets end to end on tiny digits runs
(the pure terms are tested in tests/test_synq_terms.py)."""

import dataclasses
import json
import logging
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bag_jax import dfq, experiment, methods, metrics, parallel, pool, quant, settings, step
from bag_jax.data import transforms
from bag_jax.models.mobilenet_v2 import MobileNetV2
from bag_jax.models.resnet_cifar import ResNetCifar
from bag_jax.models.resnet_imagenet import ResNet
from tests.conftest import interrupted
from tests.dfq_setup import config_with, make_setup

POOL = {'pool.size': 16, 'pool.batch_size': 8, 'pool.steps': 3, 'pool.train_batch_size': 8}


def pool_config(digits_teacher, method, **overrides):
    return config_with(digits_teacher, method, **{**POOL, **overrides})


# The Grad-CAM layer and its gradient.

@pytest.mark.parametrize('model, shape, last', [
    # As SynQ picks it (the last Conv2d module PyTorch registers): a unit's identity conv comes
    # after its body, so depth 8's last unit (which downsamples) gives its identity conv.
    (ResNetCifar(num_classes=10, depth=8), (2, 8, 8, 3), 'stage3_unit1/identity_conv'),
    (ResNetCifar(num_classes=10, depth=14), (2, 8, 8, 3), 'stage3_unit2/conv2'),
    (ResNet(num_classes=5, channels=((8, 8), (8, 8), (8, 8), (16, 16)), init_channels=8), (2, 32, 32, 3),
     'stage4_unit2/conv2'),
    (MobileNetV2(num_classes=5, channels=((8,), (8, 8), (8,), (8,), (16,)), init_channels=8, final_channels=32),
     (2, 32, 32, 3), 'final_block'),
])
def test_the_cam_layer_is_the_last_convolution_and_its_gradient_is_that_of_the_top1_logit(model, shape, last):
    """grad_cam_inputs' F and g, against the gradient of the top-1 logit with respect to an
    offset added to that convolution's output by intercepting its ConvBlock's conv (another route
    than the perturbation it uses)."""
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    variables = model.init(jax.random.PRNGKey(1), x)

    def apply(perturbations):
        extra = {} if perturbations is None else {'perturbations': perturbations}
        return model.apply({**variables, **extra}, x, mutable=['bn_inputs'])

    logits, col, features, grads = jax.jit(lambda: step.grad_cam_inputs(apply))()
    path = step.last_conv_path(col['bn_inputs'])
    assert '/'.join(path[:-1]) == last and path[-1] == 'input'

    def with_offset(offset):
        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            module = context.module
            if isinstance(module, nn.Conv) and '/'.join(module.scope.path) == f'{last}/conv':
                out = out + offset
            return out
        with nn.intercept_methods(interceptor):
            return model.apply(variables, x)

    top1 = jnp.argmax(logits, -1)
    expected = jax.jit(jax.grad(lambda o: jnp.sum(jnp.take_along_axis(with_offset(o), top1[:, None], -1))))(
        jnp.zeros_like(features))
    # Two programs computing the same numbers: rounding apart.
    np.testing.assert_allclose(grads, expected, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(expected))))
    assert float(jnp.max(jnp.abs(expected))) > 0
    np.testing.assert_allclose(logits, model.apply(variables, x), rtol=1e-4, atol=1e-5)
    # Not part of the variables that init makes (checkpoints keep params and batch_stats only).
    assert 'perturbations' not in variables and set(variables) == {'params', 'batch_stats'}


# The augmentation and the pool.

def test_resized_crop_takes_a_box_of_the_drawn_area_and_ratio_and_resizes_it_bilinearly():
    """The identity for the whole image at ratio 1; on a ramp image (value = coordinate), which a
    bilinear resize of a crop keeps a ramp, the box read back from the output: integer sides,
    inside the image, an area within the drawn scale and a ratio within the drawn range, up to
    the rounding of the sides."""
    square = jax.random.normal(jax.random.PRNGKey(1), (9, 9, 2))
    same = transforms.random_resized_crop(jax.random.PRNGKey(2), square, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_allclose(same, square, atol=1e-5)
    H, W = 12, 10
    yy, xx = np.meshgrid(np.arange(float(H)), np.arange(float(W)), indexing='ij')
    ramp = jnp.asarray(np.stack([yy, xx], -1), jnp.float32)
    boxes = set()
    for seed in range(30):
        out = np.asarray(transforms.random_resized_crop(jax.random.PRNGKey(seed), ramp))
        # Output pixel o samples top + (o + 0.5) h / H - 0.5; pixels 1 and H - 2 sample inside.
        rows, cols = out[:, 0, 0], out[0, :, 1]
        h = (rows[H - 2] - rows[1]) * H / (H - 3)
        w = (cols[W - 2] - cols[1]) * W / (W - 3)
        top, left = rows[1] - 1.5 * h / H + 0.5, cols[1] - 1.5 * w / W + 0.5
        assert abs(h - round(h)) < 1e-3 and abs(w - round(w)) < 1e-3 and abs(top - round(top)) < 1e-3
        h, w, top, left = round(h), round(w), round(top), round(left)
        assert 0 <= top and top + h <= H and 0 <= left and left + w <= W
        if h < H and w < W:    # not clipped to the image
            assert 0.5 * H * W - 0.5 * (h + w) - 0.25 <= h * w <= H * W
            assert 3 / 4 - 0.5 / h - 0.1 <= w / h <= 4 / 3 + 0.5 / h + 0.1
        boxes.add((h, w, top, left))
    assert len(boxes) > 10
    batch = transforms.augment(jax.random.PRNGKey(3), jnp.stack([ramp] * 4), 'resized_crop_flip')
    assert batch.shape == (4, H, W, 2)


def test_the_plateau_rule_is_pytorchs():
    """pool._plateau against ReduceLROnPlateau's rule written out (mode min, rel threshold 1e-4,
    patience 50, factor 0.1, min_lr 1e-4, no cooldown) over a loss that stalls twice."""
    losses_seq = [10.0 - i for i in range(5)] + [5.0] * 120 + [4.0] + [4.0] * 60
    lr, best, bad = jnp.float32(0.5), jnp.float32(jnp.inf), jnp.int32(0)
    ref_lr, ref_best, ref_bad, got, expected = 0.5, float('inf'), 0, [], []
    for loss in losses_seq:
        lr, best, bad = pool._plateau(lr, best, bad, jnp.float32(loss))
        if loss < ref_best * (1 - 1e-4):
            ref_best, ref_bad = loss, 0
        else:
            ref_bad += 1
        if ref_bad > 50:
            ref_lr, ref_bad = max(ref_lr * 0.1, 1e-4), 0
        got.append(float(lr))
        expected.append(ref_lr)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert sorted(set(expected), reverse=True)[:3] == pytest.approx([0.5, 0.05, 0.005])


def test_pool_loss_is_bns_plus_the_focal_hard_sample_term(digits_teacher):
    setup, variables = make_setup(pool_config(digits_teacher, 'hast'))
    x = jax.random.normal(jax.random.PRNGKey(0), (6, *setup.generator.image_shape))
    y = jnp.arange(6) % setup.num_classes
    total, (bns, _) = pool.pool_loss(setup.teacher, variables, x, y, 10.0, 2.0)
    logits = np.asarray(setup.teacher.apply(variables, x), np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p_y = p[np.arange(6), np.asarray(y)]
    assert float(total) == pytest.approx(float(bns) + 10.0 * np.mean((1 - p_y)**2 * -np.log(p_y)), rel=1e-5)


def test_synthesized_pool_lowers_its_loss_and_is_one_per_seed(digits_teacher):
    setup, variables = make_setup(pool_config(digits_teacher, 'hast'))
    spec = dataclasses.replace(setup.pool, size=12, batch_size=8, steps=5)
    shape = setup.generator.image_shape
    made = pool.synthesize(setup.teacher, variables, spec, pool.run_key(0), shape, setup.num_classes)
    assert made['images'].shape == (12, *shape) and made['labels'].shape == (12,)
    again = pool.synthesize(setup.teacher, variables, spec, pool.run_key(0), shape, setup.num_classes)
    np.testing.assert_array_equal(made['labels'], again['labels'])
    other = pool.synthesize(setup.teacher, variables, spec, pool.run_key(1), shape, setup.num_classes)
    assert not np.allclose(made['images'], other['images'])
    # The optimised batch has a lower loss than its starting noise.
    x_key, _ = jax.random.split(jax.random.fold_in(pool.run_key(0), 0))
    noise = jax.random.normal(x_key, (8, *shape))
    y = jnp.asarray(made['labels'][:8])
    before = pool.pool_loss(setup.teacher, variables, noise, y, spec.focal, spec.gamma)[0]
    after = pool.pool_loss(setup.teacher, variables, jnp.asarray(made['images'][:8]), y, spec.focal, spec.gamma)[0]
    assert float(after) < float(before)


# The L_p clip and the perturbation inside the step.

def test_lp_clip_sets_each_range_to_the_search_over_that_quantizers_inputs(digits_teacher):
    setup, variables = make_setup(config_with(digits_teacher, 'bag_synq'))
    state = jax.tree.map(lambda a: a[0], step.init_states(setup, variables, 0, 1, dfq_mesh()))
    # Calibrated-looking ranges to start from.
    stats = jax.tree.map(lambda a: a, state.stu_quant_stats)
    flat = flax.traverse_util.flatten_dict(stats)
    flat = {k: (jnp.float32(4.0) if k[-1] == 'x_max' else v) for k, v in flat.items()}
    state = state.replace(stu_quant_stats=flax.traverse_util.unflatten_dict(flat))
    clipped = jax.jit(lambda st: step.lp_clipped_ranges(setup, st, variables, 2, 3))(state)
    # The inputs each QuantAct sees, recorded by intercepting its call.
    @jax.jit
    def quantizer_inputs(st):
        key = jax.random.fold_in(st.rng, step.LP_CLIP_STREAM)
        images = []
        for i in range(2):
            z_key, y_key = jax.random.split(jax.random.fold_in(key, i))
            z = jax.random.normal(z_key, (setup.batch_size, setup.latent_dim))
            y = jax.random.randint(y_key, (setup.batch_size,), 0, setup.num_classes)
            images.append(setup.generator.apply({'params': st.gen_params, 'quant_stats': st.gen_quant_stats}, z, y))
        seen = {}

        def record(next_fun, args, kwargs, context):
            if isinstance(context.module, quant.QuantAct) and context.method_name == '__call__':
                seen[tuple(context.module.scope.path)] = args[0]
            return next_fun(*args, **kwargs)
        with nn.intercept_methods(record):
            setup.student.apply({'params': st.stu_params, 'batch_stats': variables['batch_stats'],
                                 'quant_stats': st.stu_quant_stats}, jnp.concatenate(images))
        return {'/'.join(path): x for path, x in seen.items()}
    seen = {tuple(path.split('/')): np.asarray(x) for path, x in quantizer_inputs(state).items()}
    out = flax.traverse_util.flatten_dict(clipped)
    assert len(seen) == sum(1 for k in out if k[-1] == 'x_max') > 3
    for path, x in seen.items():
        lo, hi = quant.lp_clip_range(x, 3)
        assert float(out[path + ('x_min',)]) == pytest.approx(float(lo), abs=1e-6)
        assert float(out[path + ('x_max',)]) == pytest.approx(float(hi), rel=1e-6)
        assert float(out[path + ('beta_t',)]) == float(flat[path + ('beta_t',)])


def dfq_mesh():
    return parallel.make_mesh(jax.devices()[:1])


def test_the_perturbed_loss_is_taken_at_the_sign_of_the_clean_losss_input_gradient(digits_teacher):
    """student_update's gradient (read back from its first Nesterov SGD step) is the clean loss's
    plus lambda times the loss's at x + eps sign(grad_x clean loss), the selection of the
    perturbed SelCE being the clean teacher's."""
    # A unit learning rate: the step's size is then the gradient's, well above float32's rounding
    # of the parameters.
    c = config_with(digits_teacher, 'bag_synq', **{'loss.perturbation': 0.5, 'loss.perturbation_eps': 0.05,
                                                   'loss.selce_tau': 0.9, 'student.lr': 1.0})
    setup, variables = make_setup(c)
    h = setup.hypers
    state = jax.tree.map(lambda a: a[0], step.init_states(setup, variables, 0, 1, dfq_mesh()))
    x = jax.random.normal(jax.random.PRNGKey(3), (8, *setup.generator.image_shape))
    y = jnp.arange(8) % setup.num_classes
    fine = step.Phase(calibrate=False, train_student=True)
    params = jax.jit(lambda st: step.student_update(setup, h, st, variables, x, y, st.stu_quant_stats, jnp.int32(0),
                                                    fine)[0])(state)
    lr, m, wd = h.student_lr, h.student_momentum, h.student_weight_decay
    got = jax.tree.map(lambda p0, p1: (p0 - p1) / (lr * (1 + m)) - wd * p0, state.stu_params, params)

    def loss(p, images, clean, selection=None):
        return step.student_terms(setup, h, variables, p, state.stu_quant_stats, images, y, False, clean,
                                  selection)[0]
    @jax.jit
    def expected_gradient(p):
        t = setup.teacher.apply(variables, x)
        grad_x = jax.grad(loss, argnums=1)(p, x, True)
        perturbed = x + 0.05 * jnp.sign(grad_x)
        return jax.tree.map(lambda a, b: a + 0.5 * b, jax.grad(loss)(p, x, True), jax.grad(loss)(p, perturbed, False, t))
    expected = expected_gradient(state.stu_params)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(e))) + 1e-7)


# Configs.

def test_presets_name_and_configure_each_method():
    from configs import base, imagenet
    assert methods.METHODS == ('gdfq', 'adadfq', 'bag', 'hast', 'synq', 'bag_synq')
    for name in methods.METHODS:
        assert methods.get(name).name == name
        assert base.get_config(name).method == name
    hast, synq, combo = (settings.parse(base.get_config(m)).dfq for m in ('hast', 'synq', 'bag_synq'))
    assert hast.pool.size == 5120 and hast.pool.train_batch_size == 64 and hast.pool.low_pass == 0
    assert (hast.hypers.kd, hast.hypers.channel_attention, hast.attention_form) == (20.0, 1000.0, 'energy_mean')
    assert (hast.hypers.perturbation, hast.hypers.perturbation_eps, hast.hypers.selce, hast.hypers.cam) == (1, 0.01, 0, 0)
    assert (synq.pool.low_pass, synq.hypers.cam, synq.hypers.selce, synq.perturbation_features) == (80, 200, 5, False)
    assert combo.pool is None and combo.range_clip == 'lp' and combo.generator.quantize
    assert (combo.hypers.selce, combo.hypers.cam, combo.hypers.perturbation) == (0.5, 50.0, 1.0)
    net = settings.parse(imagenet.get_config('resnet18', 'synq')).dfq
    assert (net.hypers.selce, net.hypers.cam, net.perturbation_features, net.pool.focal) == (0.5, 50.0, True, 0.1)


def test_bad_beyond_bag_values_name_the_field(digits_teacher):
    cases = [({'pool.augment': 'rotate'}, r"pool.augment='rotate' is not allowed: choose one of 'none'"),
             ({'loss.selce_tau': 0.0}, r'loss.selce_tau=0.0 is not allowed: use a number greater than 0.0'),
             ({'range_clip': 'mse'}, r"range_clip='mse' is not allowed: choose one of 'none', 'lp'"),
             ({'warmup_epochs': 0}, r'warmup_epochs \(0\) must equal calibration_epochs \(1\)'),
             ({'pool.train_batch_size': 17}, r'pool.train_batch_size=17 is not allowed: use an integer of at least 1 '
                                             r'and at most 16')]
    for fields, message in cases:
        with pytest.raises(ValueError, match=message):
            settings.parse(pool_config(digits_teacher, 'synq', **fields))
    with pytest.raises(ValueError, match=r'pool.train_batch_size=6 does not split over the 4 devices of each run: '
                                         r'use a multiple of 4\.'):
        settings.check_device_split(settings.parse(pool_config(digits_teacher, 'synq', **{'pool.train_batch_size': 6})), 4)


# End to end.

@pytest.mark.parametrize('method', ['hast', 'bag_synq'])
def test_end_to_end(digits_teacher, tmp_path, method):
    c = pool_config(digits_teacher, method) if method in methods.POOL_METHODS else config_with(digits_teacher, method)
    summary = experiment.run(c, str(tmp_path))
    assert summary['method'] == method and summary['iterations'] == 4
    lines = [m for m in json.load(open(tmp_path / 'summary.json'))['runs']]
    assert len(lines) == 1 and 0 <= summary['last_top1'] <= 100
    epochs = [m for m in metrics.read_metrics(str(tmp_path)) if m['phase'] == method]
    assert [m['step'] for m in epochs] == [1, 2]
    if method == 'hast':   # fine-tuning on the pool: no generator
        assert epochs[1]['loss_g'] == 0 and epochs[1]['bns'] == 0 and epochs[0]['loss_g'] != 0
    assert all(np.isfinite(m['loss_s']) for m in epochs)


def test_synq_resumes_with_its_pool_and_does_not_make_it_again(digits_teacher, tmp_path, monkeypatch, caplog):
    c = pool_config(digits_teacher, 'synq', epochs=3)
    reference = dfq.train_and_evaluate(settings.parse(c), str(tmp_path / 'a'))
    interrupted(monkeypatch, lambda: dfq.train_and_evaluate(settings.parse(c), str(tmp_path / 'b')), epoch=2,
                phase='synq')
    made = []
    monkeypatch.setattr(pool, 'synthesize', lambda *a, **k: made.append(1))
    with caplog.at_level(logging.INFO):
        resumed = dfq.train_and_evaluate(settings.parse(c), str(tmp_path / 'b'))
    assert not made and 'resuming after epoch 1 of 3' in caplog.text
    for key in ('best_top1', 'last_top1', 'ptq_top1'):
        assert resumed[key] == reference[key]
    from bag_jax import checkpoint
    a = checkpoint.load_model(str(tmp_path / 'a' / 'student'))[2]
    b = checkpoint.load_model(str(tmp_path / 'b' / 'student'))[2]
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert os.path.isdir(tmp_path / 'b' / 'student')

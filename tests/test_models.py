"""ResNetCifar and Generator: shapes, parameter counts from the architecture's formula, the
student's quantization against numpy-quantized weights, and the optional collections."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bag_jax.models import Generator, ResNetCifar, bn_input_pairs, generator, unit_features
from bag_jax.quant import QuantSpec
from tests.quant_reference import quantize_kernels_numpy
from tests.trajectories import assert_rounding_close, flat


def resnet_param_count(depth, classes, in_channels):
    """Parameter count of pytorchcv's CIFARResNet, from its layer list (docs/algorithms.md 1.2)."""
    n = (depth - 2) // 6
    conv = lambda cin, cout, k: k * k * cin * cout + 2 * cout  # conv (no bias) + BN gamma/beta
    total = conv(in_channels, 16, 3)
    cin = 16
    for cout in (16, 32, 64):
        for _ in range(n):
            total += conv(cin, cout, 3) + conv(cout, cout, 3) + (conv(cin, cout, 1) if cin != cout else 0)
            cin = cout
    return total + 64 * classes + classes


def generator_param_count(classes, latent, h, w, c):
    h0, w0 = -(-h // 4), -(-w // 4)
    return (classes * latent + latent * 128 * h0 * w0 + 128 * h0 * w0 + 2 * 128
            + 9 * 128 * 128 + 128 + 2 * 128 + 9 * 128 * 64 + 64 + 2 * 64 + 9 * 64 * c + c)


def count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


def init_resnet(model, shape, seed=0):
    return jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((2,) + shape))


def test_resnet20_cifar100_size_and_collections():
    variables = init_resnet(ResNetCifar(num_classes=100), (32, 32, 3))
    assert set(variables) == {'params', 'batch_stats'}          # init keeps no sown tensors
    assert count(variables['params']) == resnet_param_count(20, 100, 3) == 278_324
    assert len(jax.tree.leaves(variables['batch_stats'])) == 2 * 21  # 21 BatchNorms


@pytest.mark.parametrize('depth', [32, 44, 56])
def test_deeper_resnets_from_the_same_code(depth):
    model = ResNetCifar(num_classes=10, depth=depth)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    assert count(shapes['params']) == resnet_param_count(depth, 10, 3)


@pytest.mark.parametrize('depth', [19, 4, 21.0])
def test_bad_depth(depth):
    with pytest.raises(ValueError, match='teacher.depth'):
        init_resnet(ResNetCifar(num_classes=10, depth=depth), (8, 8, 1))


@pytest.mark.parametrize('shape,classes', [((32, 32, 3), 100), ((8, 8, 1), 10), ((28, 28, 1), 10)])
def test_resnet_shapes_follow_the_data(shape, classes):
    model = ResNetCifar(num_classes=classes, quant=QuantSpec(3, 3))
    variables = init_resnet(model, shape)
    assert count(variables['params']) == resnet_param_count(20, classes, shape[-1])
    x = jax.random.normal(jax.random.PRNGKey(1), (3,) + shape)
    logits, _ = jax.jit(lambda v, x: model.apply(v, x, calibrate=True, mutable=['quant_stats']))(variables, x)
    assert logits.shape == (3, classes) and bool(jnp.all(jnp.isfinite(logits)))


def test_eval_mode_uses_running_statistics():
    model = ResNetCifar(num_classes=10)
    variables = init_resnet(model, (8, 8, 1))
    variables = jax.tree.map(lambda a: a + 0.1, variables)   # non-trivial running statistics
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 8, 8, 1))
    batch = model.apply(variables, x)
    single = model.apply(variables, x[:2])
    np.testing.assert_allclose(batch[:2], single, rtol=1e-5, atol=1e-6)


def test_teacher_training_mode_updates_running_statistics_like_pytorch():
    model = ResNetCifar(num_classes=10)
    variables = init_resnet(model, (8, 8, 1))
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 8, 8, 1))
    _, new = model.apply(variables, x, train=True, mutable=['batch_stats', 'bn_inputs'])
    bn_in = np.asarray(new['bn_inputs']['init_block']['input'])
    stats = new['batch_stats']['init_block']['bn']
    np.testing.assert_allclose(stats['mean'], 0.1 * bn_in.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-7)
    # PyTorch's running_var takes the unbiased batch variance; Flax takes the biased one.
    expected_var = 0.9 + 0.1 * bn_in.var(axis=(0, 1, 2))
    np.testing.assert_allclose(stats['var'], expected_var, rtol=1e-4)


def test_sown_tensors_only_when_asked():
    model = ResNetCifar(num_classes=100)
    variables = init_resnet(model, (32, 32, 3))
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 32, 32, 3))
    plain = model.apply(variables, x)
    assert isinstance(plain, jax.Array)
    logits, sown = model.apply(variables, x, mutable=['bn_inputs', 'features'])
    np.testing.assert_array_equal(logits, plain)
    pairs = bn_input_pairs(sown['bn_inputs'], variables['batch_stats'])
    assert len(pairs) == 21
    for inputs, mean, var in pairs:
        assert inputs.shape[-1] == mean.shape[0] == var.shape[0]
    branches = unit_features(sown['features'], 'branch')
    assert [b.shape[1:] for b in branches] == [(32, 32, 16)] * 3 + [(16, 16, 32)] * 3 + [(8, 8, 64)] * 3
    assert len(unit_features(sown['features'], 'out')) == 9


def test_student_quantizes_every_conv_and_the_dense_head():
    teacher = ResNetCifar(num_classes=10)
    variables = init_resnet(teacher, (8, 8, 1))
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 8, 1))
    student = ResNetCifar(num_classes=10, quant=QuantSpec(w_bits=3))
    expected = teacher.apply({'params': quantize_kernels_numpy(variables['params'], 3),
                              'batch_stats': variables['batch_stats']}, x)
    np.testing.assert_allclose(student.apply(variables, x), expected, rtol=1e-4, atol=1e-4)
    assert len(flax.traverse_util.flatten_dict(variables['params'])) - 2 * 21 - 1 == 22  # 22 kernels


def test_student_activations_take_at_most_two_to_the_bits_values():
    student = ResNetCifar(num_classes=10, quant=QuantSpec(3, 3))
    variables = init_resnet(student, (8, 8, 1))
    assert len(jax.tree.leaves(variables['quant_stats'])) == 3 * 19    # a QuantAct after each ReLU
    x = jax.random.normal(jax.random.PRNGKey(4), (8, 8, 8, 1))
    _, new = student.apply(variables, x, calibrate=True, mutable=['quant_stats'])
    _, sown = student.apply({**variables, **new}, x, mutable=['features'])
    for out in unit_features(sown['features'], 'out'):
        assert len(np.unique(np.asarray(out))) <= 8
    assert len(np.unique(np.asarray(unit_features(sown['features'], 'branch')[0]))) > 8   # not quantized


def test_generator_size_and_shapes():
    gen = Generator(num_classes=100, image_shape=(32, 32, 3))
    z, y = jnp.zeros((2, 100)), jnp.zeros((2,), jnp.int32)
    variables = gen.init(jax.random.PRNGKey(0), z, y)
    assert set(variables) == {'params'}                        # no running statistics are kept
    assert count(variables['params']) == generator_param_count(100, 100, 32, 32, 3) == 1_061_139
    for shape, classes in [((8, 8, 1), 10), ((28, 28, 1), 10), ((30, 26, 3), 5)]:
        gen = Generator(num_classes=classes, image_shape=shape, latent_dim=16)
        shapes = jax.eval_shape(gen.init, jax.random.PRNGKey(0), jnp.zeros((2, 16)), jnp.zeros((2,), jnp.int32))
        assert count(shapes['params']) == generator_param_count(classes, 16, *shape)
        images = jax.eval_shape(gen.apply, shapes, jax.random.normal(jax.random.PRNGKey(1), (6, 16)), jnp.arange(6) % classes)
        assert images.shape == (6,) + shape


def test_generator_output_is_standardized_per_channel_over_the_batch():
    gen = Generator(num_classes=10, image_shape=(8, 8, 3), latent_dim=16)
    v = gen.init(jax.random.PRNGKey(0), jnp.zeros((2, 16)), jnp.zeros((2,), jnp.int32))
    images = np.asarray(gen.apply(v, jax.random.normal(jax.random.PRNGKey(1), (16, 16)), jnp.arange(16) % 10))
    np.testing.assert_allclose(images.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    # var / (var + 1e-5) of the tanh output: just under 1.
    var = images.var(axis=(0, 1, 2))
    assert np.all(var <= 1.0) and np.all(var > 0.99)


def test_bag_generator_quantizes_linear_and_conv_weights_only():
    fp = Generator(num_classes=10, image_shape=(8, 8, 1), latent_dim=16)
    bag = Generator(num_classes=10, image_shape=(8, 8, 1), latent_dim=16, quant=QuantSpec(w_bits=3))
    z, y = jax.random.normal(jax.random.PRNGKey(1), (6, 16)), jnp.arange(6)
    v = fp.init(jax.random.PRNGKey(0), z, y)
    expected = fp.apply({'params': quantize_kernels_numpy(v['params'], 3)}, z, y)   # embedding stays FP
    np.testing.assert_allclose(bag.apply(v, z, y), expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(bag.apply(v, z, y), fp.apply(v, z, y), atol=1e-3)


def _conv_of_upsampled(lhs, rhs, *args, **kwargs):
    """The generator's layer as the reference writes it: nearest x2 upsampling, then the conv."""
    upsampled = jnp.repeat(jnp.repeat(lhs, 2, axis=1), 2, axis=2)
    return jax.lax.conv_general_dilated(upsampled, rhs, *args, **kwargs)


@pytest.mark.parametrize('ours, reference, shape, features', [
    (generator.upsample2x_conv, _conv_of_upsampled, (2, 4, 4, 8), 6),     # kernel gradient: shifted inputs
    (generator.upsample2x_conv, _conv_of_upsampled, (3, 3, 5, 2), 6),
    (generator.upsample2x_conv, _conv_of_upsampled, (2, 3, 4, 32), 3),    # (the 2x2 conv has 12 outputs)
    (generator.conv3x3, jax.lax.conv_general_dilated, (2, 5, 4, 8), 3),   # shifted cotangents
    (generator.conv3x3, jax.lax.conv_general_dilated, (2, 4, 6, 3), 8),   # shifted inputs
])
def test_generator_convs_match_lax_conv(ours, reference, shape, features):
    """The generator's convolutions against lax.conv_general_dilated (on the upsampled input for
    the sub-pixel one): the values and both gradients (input and kernel, the latter computed by
    the custom VJP's matmuls), square and odd, non-square sizes."""
    kx, kk, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, shape)
    kernel = jax.random.normal(kk, (3, 3, shape[-1], features))
    scale = 2 if ours is generator.upsample2x_conv else 1
    cotangent = jax.random.normal(kg, (shape[0], scale * shape[1], scale * shape[2], features))
    args = ((1, 1), ((1, 1), (1, 1)))
    dn = jax.lax.conv_dimension_numbers(shape, kernel.shape, ('NHWC', 'HWIO', 'NHWC'))
    results = {}
    for name, conv in [('ours', ours), ('reference', reference)]:
        def value_and_grads(x, k, conv=conv):
            y, vjp = jax.vjp(lambda x, k: conv(x, k, *args, dimension_numbers=dn), x, k)
            return (y,) + vjp(cotangent)
        results[name] = jax.jit(value_and_grads)(x, kernel)
    for a, b in zip(results['ours'], results['reference']):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(b))))
    with pytest.raises(ValueError, match='3x3, stride-1'):
        ours(x, kernel, (2, 2), ((1, 1), (1, 1)))


def test_generator_matches_the_upsample_then_conv_layers(monkeypatch):
    """The BAG generator (quantized kernels, QuantActs) with its sub-pixel and custom-gradient
    convs against the same generator with the reference's upsample-then-conv layers: the loss and
    the parameter gradients, relative to the whole gradient's largest entry (the conv biases
    before a batch-statistics BN have gradients that are zero up to rounding)."""
    gen = Generator(num_classes=10, image_shape=(8, 8, 3), latent_dim=16, quant=QuantSpec(3, 3))
    z, y = jax.random.normal(jax.random.PRNGKey(1), (6, 16)), jnp.arange(6)
    v = gen.init(jax.random.PRNGKey(0), z, y)
    weights = jax.random.normal(jax.random.PRNGKey(2), (6, 8, 8, 3))

    def run():
        def loss(params):
            return jnp.sum(gen.apply({**v, 'params': params}, z, y) * weights)
        return jax.jit(jax.value_and_grad(loss))(v['params'])
    (loss, grads) = run()
    monkeypatch.setattr(generator, 'upsample2x_conv', _conv_of_upsampled)
    monkeypatch.setattr(generator, 'conv3x3', jax.lax.conv_general_dilated)
    (reference_loss, reference_grads) = run()
    np.testing.assert_allclose(loss, reference_loss, rtol=1e-5)
    assert_rounding_close(flat(grads), flat(reference_grads), 1e-5, 'generator gradient: ', per_array=False)


def test_generator_activation_quantizers():
    gen = Generator(num_classes=10, image_shape=(8, 8, 1), latent_dim=16, quant=QuantSpec(3, 3))
    z, y = jax.random.normal(jax.random.PRNGKey(1), (6, 16)), jnp.arange(6)
    v = gen.init(jax.random.PRNGKey(0), z, y)
    assert set(v['quant_stats']) == {'act_quant1', 'act_quant2'}
    _, new = gen.apply(v, z, y, calibrate=True, mutable=['quant_stats'])
    assert float(new['quant_stats']['act_quant1']['x_min']) < 0 < float(new['quant_stats']['act_quant1']['x_max'])


def imagenet_generator_param_count(classes, latent, h, w, c):
    """The ImageNet generator (docs/imagenet.md 3): no label embedding; conditional BNs with a
    (classes, C) scale and bias table each instead of one scale and bias per channel."""
    h0, w0 = -(-h // 4), -(-w // 4)
    return (latent * 128 * h0 * w0 + 128 * h0 * w0 + 2 * classes * 128
            + 9 * 128 * 128 + 128 + 2 * classes * 128 + 9 * 128 * 64 + 64 + 2 * classes * 64 + 9 * 64 * c + c)


def test_imagenet_generator_size():
    gen = Generator(num_classes=1000, image_shape=(224, 224, 3), conditioning='batchnorm')
    shapes = jax.eval_shape(gen.init, jax.random.PRNGKey(0), jnp.zeros((2, 100)), jnp.zeros((2,), jnp.int32))
    params = shapes['params']
    assert 'label_emb' not in params
    assert count(params) == imagenet_generator_param_count(1000, 100, 224, 224, 3) == 41_405_315   # 41.4M
    assert count(params['l1']) == 40_542_208                                                       # 40.5M
    assert params['bn0']['scale'].shape == (1000, 128) and params['bn2']['bias'].shape == (1000, 64)
    images = jax.eval_shape(gen.apply, shapes, jnp.zeros((4, 100)), jnp.arange(4))
    assert images.shape == (4, 224, 224, 3)


def test_conditional_batchnorm_against_numpy():
    from bag_jax.models.generator import ConditionalBatchStatNorm
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3, 2, 4)).astype(np.float32) * 3 + 1
    y = np.array([0, 2, 1, 2, 0])
    scale, bias = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)
    out = ConditionalBatchStatNorm(3, epsilon=0.8).apply({'params': {'scale': scale, 'bias': bias}}, x, y)
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))          # biased, as PyTorch in train mode
    expected = (x - mean) / np.sqrt(var + 0.8) * scale[y][:, None, None] + bias[y][:, None, None]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_imagenet_generator_conditions_through_batchnorm_only():
    gen = Generator(num_classes=10, image_shape=(8, 8, 3), latent_dim=16, conditioning='batchnorm')
    z = jax.random.normal(jax.random.PRNGKey(1), (6, 16))
    v = gen.init(jax.random.PRNGKey(0), z, jnp.zeros((6,), jnp.int32))
    # Tables at their init (scale 1, bias 0): the label changes nothing, as in the reference.
    np.testing.assert_array_equal(gen.apply(v, z, jnp.zeros((6,), jnp.int32)), gen.apply(v, z, jnp.arange(6)))
    tables = jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.5 * jax.random.normal(jax.random.PRNGKey(len(path)), a.shape)
        if path[0].key.startswith('bn') else a, v['params'])
    a, b = gen.apply({'params': tables}, z, jnp.zeros((6,), jnp.int32)), gen.apply({'params': tables}, z, jnp.arange(6))
    assert not np.allclose(a, b, atol=1e-3)
    bag = Generator(num_classes=10, image_shape=(8, 8, 3), latent_dim=16, conditioning='batchnorm',
                    quant=QuantSpec(w_bits=3))
    expected = gen.apply({'params': quantize_kernels_numpy(tables, 3)}, z, jnp.arange(6))   # tables stay FP
    np.testing.assert_allclose(bag.apply({'params': tables}, z, jnp.arange(6)), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="generator.conditioning='film'"):
        Generator(num_classes=10, image_shape=(8, 8, 3), conditioning='film').init(
            jax.random.PRNGKey(0), z, jnp.zeros((6,), jnp.int32))

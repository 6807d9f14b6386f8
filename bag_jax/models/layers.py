"""Small pieces shared by the ResNet and the generator: PyTorch's default initializers and a
batch-statistics normalization."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's default Linear/Conv2d init, kaiming_uniform(a=sqrt(5)), is U(+-1/sqrt(fan_in)) for the
# weight; the bias is U(+-1/sqrt(fan_in)) too (spec 3).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
# pytorchcv's CIFARResNet re-initializes its convs with kaiming_uniform_ (gain sqrt(2)).
kaiming_uniform_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'uniform')


def torch_default_bias_init(fan_in: int):
    """Returns an initializer drawing U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's bias default."""
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class BatchStatNorm(nn.Module):
    """BatchNorm that always normalizes with the statistics of the batch it is given.

    This is PyTorch's BatchNorm2d in train() mode, as the GDFQ generator always is (spec 3): the
    running statistics are never read, so none are kept. Mean and biased variance are taken over
    every axis but the last (channels). Returns an array of x's shape.
    """
    epsilon: float = 1e-5
    affine: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(x, axis=axes)
        var = jnp.mean(jnp.square(x - mean), axis=axes)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.affine:
            features = x.shape[-1]
            y = y * self.param('scale', nn.initializers.ones, (features,))
            y = y + self.param('bias', nn.initializers.zeros, (features,))
        return y

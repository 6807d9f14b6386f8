"""Networks: the CIFAR ResNet (teacher and quantized student) and the GDFQ/BAG generator."""
from bag_jax.models.generator import Generator
from bag_jax.models.resnet_cifar import ResNetCifar, bn_input_pairs, unit_features

__all__ = ['Generator', 'ResNetCifar', 'bn_input_pairs', 'unit_features']

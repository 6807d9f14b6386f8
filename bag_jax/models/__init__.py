"""Networks: the classifiers (teacher and quantized student: the CIFAR ResNet, pytorchcv's ImageNet
ResNet-18/50 and MobileNetV2), the architecture registry, and the GDFQ/BAG generators."""
from bag_jax.models.generator import Generator
from bag_jax.models.mobilenet_v2 import MobileNetV2
from bag_jax.models.registry import ARCHITECTURES, PYTORCHCV_NETWORKS, build, describe, quantized
from bag_jax.models.resnet_cifar import ResNetCifar, bn_input_pairs, unit_features
from bag_jax.models.resnet_imagenet import ResNet

__all__ = ['ARCHITECTURES', 'PYTORCHCV_NETWORKS', 'Generator', 'MobileNetV2', 'ResNet', 'ResNetCifar', 'bn_input_pairs', 'build',
           'describe', 'quantized', 'unit_features']

"""CIFAR-10, ResNet-20, W5A5: configs/cifar100_w5a5.py with CIFAR-10's data and teacher.

    python run.py --config=configs/cifar10_w5a5.py --workdir=runs/c10_w5a5_bag
    python run.py --config=configs/cifar10_w5a5.py:adadfq --workdir=runs/c10_w5a5_adadfq
    python run.py --config=configs/cifar10_w5a5.py:gdfq --workdir=runs/c10_w5a5_gdfq

The AdaDFQ CIFAR-10 hocon equals the CIFAR-100 one but for the dataset (docs/algorithms.md 6.2). Teacher:
pytorchcv's resnet20_cifar10 (python -m bag_jax.convert --pytorchcv resnet20_cifar10-0597-....pth
--out DIR, then --config.teacher.checkpoint=DIR), or one trained first into WORKDIR/teacher.
"""

from configs import cifar100_w5a5


def get_config(method: str = 'bag'):
    c = cifar100_w5a5.get_config(method)
    c.data.name = 'cifar10'
    return c

"""CIFAR-100, ResNet-20, W3A3: BAG by default; the argument picks GDFQ or AdaDFQ instead.

    python run.py --config=configs/cifar100_w3a3.py --workdir=runs/c100_w3a3_bag
    python run.py --config=configs/cifar100_w3a3.py:adadfq --workdir=runs/c100_w3a3_adadfq
    python run.py --config=configs/cifar100_w3a3.py:gdfq --workdir=runs/c100_w3a3_gdfq

Add --config.teacher.checkpoint=DIR to use a converted pytorchcv teacher
(python -m bag_jax.convert --pytorchcv resnet20_cifar100-2964-a5322afe.pth --out DIR).
"""

from configs import base


def get_config(method: str = 'bag'):
    c = base.get_config(method)
    c.quant.w_bits = 3
    c.quant.a_bits = 3
    return c

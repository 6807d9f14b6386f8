"""Shared settings of the ImageNet experiments (ResNet-18, ResNet-50, MobileNetV2 from the
pytorchcv zoo), from the official ImageNet code (docs/imagenet.md 5).

The reference ships 3-bit ImageNet configs only; its W4A4 values exist as comments in them,
and these configs take those (docs/imagenet.md 5):

    network          warmup  lr_S   milestones       alpha_ds  lambda_l   (AdaDFQ and BAG)
    resnet18           50    1e-5   (350, 400)         0.2       0.3
    mobilenetv2_w1     50    1e-5   (350, 400)         0.3       0.1
    resnet50           50    1e-4   (200, 300, 400)    0.1       0.3

All: batch 16, 400 epochs x 200 iterations, lr_G 1e-3, Adam(0.5, 0.999), SGD 0.9 Nesterov with
weight decay 1e-4, decay 0.1, alpha_as 0.1, lambda_u 0.8, beta = gamma = 1, and AdaDFQ's Q
temperature 5 (hard-coded in its ImageNet trainer; 20 on CIFAR). A milestone of 400 never
fires (the reference's rule is epoch + 1 > m), so ResNet-18 and MobileNetV2 decay once.
GDFQ (its ResNet-18 config; the same for the other two networks, for which GDFQ ships none):
warmup 50, lr_S 1e-6, milestones (100, 200, 300), L_Q = CE + KD at T = 20.
The generator is the ImageNet one (class-conditional BatchNorm, 224x224, docs/imagenet.md 3).
HAST and SynQ: their ImageNet code's values (below); bag_synq: BAG's with SynQ's ImageNet weights.
A pool of 5,120 224x224 images is 3.1 GB per seed (float32), held on the device with the run.
"""

from configs import base

_NETWORKS = {
    # network: (lr_S, milestones, alpha_ds, lambda_l) of AdaDFQ/BAG at W4A4
    'resnet18': (1e-5, (350, 400), 0.2, 0.3),
    'mobilenetv2_w1': (1e-5, (350, 400), 0.3, 0.1),
    'resnet50': (1e-4, (200, 300, 400), 0.1, 0.3),
}


def get_config(network: str, method: str, bits: int = 4):
    """The ImageNet W{bits}A{bits} experiment of `network` (a key of _NETWORKS) for `method`."""
    c = base.get_config(method)
    c.quant.w_bits = bits
    c.quant.a_bits = bits
    c.batch_size = 16
    c.warmup_epochs = 50
    c.generator.conditioning = 'batchnorm'
    c.data.name = 'imagenet2012'
    c.teacher.checkpoint = f'pytorchcv:{network}'
    if method in ('hast', 'synq'):
        # HAST's and SynQ's ImageNet settings (their config/imagenet*.hocon, run_imagenet.sh):
        # calibration 4 epochs, then 101 (SynQ) / 151 (HAST) epochs at batch 4, lr_S 1e-6
        # /10 at 100, 200, 350; pool focal 0.1, gamma 0.5; SynQ lambda_CE 0.5, lambda_CAM 50,
        # the perturbed loss with feature alignment.
        c.warmup_epochs = 4
        c.epochs = 101 if method == 'synq' else 151
        c.student.lr = 1e-6
        c.lr_milestones = (100, 200, 350)
        c.pool.train_batch_size = 4
        c.pool.focal = 0.1
        c.pool.gamma = 0.5
        c.loss.perturbation_features = True
        if method == 'synq':
            c.loss.selce = 0.5
            c.loss.cam = 50.0
    elif method == 'gdfq':
        c.student.lr = 1e-6
        c.lr_milestones = (100, 200, 300)
    else:
        lr, milestones, alpha_ds, lambda_l = _NETWORKS[network]
        c.student.lr = lr
        c.lr_milestones = milestones
        c.loss.alpha_ds = alpha_ds
        c.loss.lambda_l = lambda_l
        c.loss.temperature = 5.0
        if method == 'bag_synq':   # SynQ's ImageNet weights
            c.loss.selce = 0.5
            c.loss.cam = 50.0
    return c

"""Full-precision ResNet-20 teacher on CIFAR-100 (a stand-in for the pytorchcv zoo weights).

    python run.py --config=configs/cifar100_teacher.py --workdir=runs/c100_teacher

It writes the teacher to WORKDIR/teacher; a quantization config uses it with
--config.teacher.checkpoint=runs/c100_teacher/teacher (or trains one itself when that is unset).

Recipe: 200 epochs of SGD (Nesterov momentum 0.9, batch 128, lr 0.1 with cosine decay to 0,
coupled weight decay 5e-4), random 4-pixel-padded crops and horizontal flips. This is the
standard CIFAR ResNet recipe (He et al. 2016 trained 164 epochs with step decay; cosine decay
and 5e-4 decay are the usual choices for the thin 16/32/64-channel ResNets, whose capacity
rather than overfitting limits them). The target is the pytorchcv zoo's 70.36 % top-1; this
project has not yet run the recipe on CIFAR-100, so no accuracy is claimed for it.
"""

from configs import base


def get_config(arg=None):
    c = base.get_config('bag')
    c.mode = 'teacher'
    c.data.name = 'cifar100'
    # The recipe above is base.py's teacher.* defaults (depth 20, 200 epochs, batch 128, lr 0.1,
    # momentum 0.9, weight decay 5e-4), which quantization runs also use to train a teacher.
    return c

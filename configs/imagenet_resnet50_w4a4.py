"""ImageNet, pytorchcv resnet50 teacher, W4A4: BAG by default; the argument picks GDFQ or AdaDFQ.

    python run.py --config=configs/imagenet_resnet50_w4a4.py --workdir=runs/in_resnet50_w4a4_bag
    python run.py --config=configs/imagenet_resnet50_w4a4.py:adadfq --workdir=runs/in_resnet50_w4a4_adadfq
    python run.py --config=configs/imagenet_resnet50_w4a4.py:gdfq --workdir=runs/in_resnet50_w4a4_gdfq

The teacher is fetched once from the pytorchcv zoo (teacher.checkpoint=pytorchcv:resnet50; offline,
the error says where to put the file). The ImageNet validation set comes from tensorflow-datasets
(data.name='imagenet2012', a manual download) or from a folder of class folders:
--config.data.name=imagefolder --config.data.imagefolder_dir=/path/to/val. Hyperparameters:
configs/imagenet.py.
"""

from configs import imagenet


def get_config(method: str = 'bag'):
    return imagenet.get_config('resnet50', method)

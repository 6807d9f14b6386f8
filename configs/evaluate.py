"""Evaluates a teacher or student checkpoint on the real test split of its dataset.

    python run.py --config=configs/evaluate.py --config.checkpoint=DIR --workdir=W

DIR is a teacher (W/teacher of a teacher run, or the output of `python -m bag_jax.convert`) or a
student (W/student of a quantization run). The dataset is the one the checkpoint records;
--config.data.tfds_dir / --config.data.npz_path say where its files are. Writes W/summary.json
with top-1, top-5 and the number of test images.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.mode = 'evaluate'
    c.checkpoint = config_dict.placeholder(str)
    c.eval_batch_size = 200
    c.data = ml_collections.ConfigDict()
    c.data.name = config_dict.placeholder(str)   # default: the checkpoint's dataset
    c.data.npz_path = config_dict.placeholder(str)
    c.data.tfds_dir = config_dict.placeholder(str)
    c.data.digits_test_fraction = 0.25   # digits only: as the quantization run that made the checkpoint
    c.data.imagefolder_dir = config_dict.placeholder(str)   # imagefolder: a directory of class folders
    c.data.image_size = 224              # imagefolder / imagenet2012: the centre crop (resized to 256/224 of it first)
    return c

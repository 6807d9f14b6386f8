"""Evaluates a teacher or student checkpoint on the real test split of its dataset.

    python run.py --config=configs/evaluate.py --config.checkpoint=DIR --workdir=W

DIR is a teacher (W/teacher of a teacher run, or the output of `python -m bag_jax.convert`) or a
student (W/student of a quantization run). The data are those the checkpoint records (the run's
data.name, npz_path / tfds_dir / imagefolder_dir, digits_test_fraction, image_size); each
--config.data.FIELD that is set overrides its recorded value (a checkpoint that records none, e.g.
a converted one, is scored on its dataset with these fields). Prints top-1 and top-5 as a table
and writes W/summary.json with them and the number of test images.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.mode = 'evaluate'
    c.checkpoint = config_dict.placeholder(str)
    c.eval_batch_size = 200
    # Unset: the checkpoint's recorded value (bag_jax.checkpoint.data_config_for).
    c.data = ml_collections.ConfigDict()
    c.data.name = config_dict.placeholder(str)
    c.data.npz_path = config_dict.placeholder(str)
    c.data.tfds_dir = config_dict.placeholder(str)
    c.data.digits_test_fraction = config_dict.placeholder(float)   # digits (0.25 when nothing is recorded)
    c.data.imagefolder_dir = config_dict.placeholder(str)   # imagefolder: a directory of class folders
    # imagefolder / imagenet2012: the centre crop (resized to 256/224 of it first); the checkpoint's by default
    c.data.image_size = config_dict.placeholder(int)
    return c

"""Real-image data: the sources (sources.py's registry), the dataset types, ImageNet's transform,
normalization and augmentation on device, host-side batching.

Data-free quantization trains on generated images only; real images serve to evaluate on the
test split and to train a full-precision teacher. The small sources are therefore read once into
host memory as uint8 numpy arrays (CIFAR is 150 MB) and served from there (`ArrayDataset`).
ImageNet's 50,000 validation images are not: they are decoded and preprocessed on the host as
the evaluation asks for them, each process its share (`StreamingDataset`). Normalization and
augmentation are pure `jnp` functions that run on device inside the compiled step.

Sources (`data.name`; sources.py's REGISTRY is the one list of them), by module:
  tfds_cifar.py   cifar100, cifar10: tfds through tf.data (needs TensorFlow); offline, point
                  `data.tfds_dir` at a prepared copy.
  arrays.py       digits: scikit-learn's bundled 8x8 digits, offline, for tiny runs and tests;
                  npz: the user's file `data.npz_path` with x_train, y_train, x_test, y_test.
  imagenet.py     imagenet2012: the ILSVRC2012 validation split of tfds's `imagenet2012`, prepared
                  from a manual download in `data.tfds_dir`; evaluation only (no train split).
  imagefolder.py  imagefolder: `data.imagefolder_dir`, one folder of images per class
                  (torchvision's ImageFolder layout); evaluation only.
The last two get the reference's evaluation transform (docs/imagenet.md 6), with Pillow.

Modules: types.py (DatasetInfo, ArrayDataset, StreamingDataset, errors, process shares),
sources.py (the registry, load_dataset, dataset_info), one module per source family (above),
transforms.py (normalize, augment, low_pass_filter), batches.py (train_batches, eval_batches,
steps_per_epoch), streamer.py (the threaded reader of a StreamingDataset). This package
re-exports their public names: `from bag_jax import data; data.load_dataset(...)`.
"""

from bag_jax.data.batches import eval_batches, steps_per_epoch, train_batches
from bag_jax.data.imagefolder import IMAGE_EXTENSIONS
from bag_jax.data.imagenet import (IMAGENET_CLASSES, IMAGENET_IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD,
                                   imagenet_class_ids, imagenet_info, imagenet_resize_size, preprocess_image,
                                   read_image)
from bag_jax.data.sources import (DATA_FIELDS, REGISTRY, SOURCES, STREAMING_SOURCES, Source, cifar_info,
                                  class_names, crops_to_image_size, dataset_info, family, load_dataset, source)
from bag_jax.data.tfds_cifar import (CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, CIFAR100_CLASSES, CIFAR100_MEAN,
                                     CIFAR100_STD)
from bag_jax.data.transforms import augment, gaussian_low_pass_mask, low_pass_filter, normalize
from bag_jax.data.types import (AUGMENTATIONS, ArrayDataset, DatasetInfo, DatasetUnavailableError,
                                NoTrainSplitError, StreamingDataset, require_train_split)

__all__ = [
    'AUGMENTATIONS', 'ArrayDataset', 'CIFAR10_CLASSES', 'CIFAR10_MEAN', 'CIFAR10_STD', 'CIFAR100_CLASSES',
    'CIFAR100_MEAN', 'CIFAR100_STD', 'DATA_FIELDS', 'DatasetInfo', 'DatasetUnavailableError', 'IMAGE_EXTENSIONS',
    'IMAGENET_CLASSES', 'IMAGENET_IMAGE_SIZE', 'IMAGENET_MEAN', 'IMAGENET_STD', 'NoTrainSplitError', 'REGISTRY',
    'SOURCES', 'STREAMING_SOURCES', 'Source', 'StreamingDataset', 'augment', 'cifar_info', 'class_names',
    'crops_to_image_size', 'dataset_info', 'eval_batches', 'family', 'gaussian_low_pass_mask',
    'imagenet_class_ids', 'imagenet_info', 'imagenet_resize_size', 'load_dataset', 'low_pass_filter', 'normalize',
    'preprocess_image', 'read_image', 'require_train_split', 'source', 'steps_per_epoch', 'train_batches',
]

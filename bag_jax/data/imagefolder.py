"""The image-folder source imagefolder: ImageNet-style folders of images, one per class (the
layout of torchvision's ImageFolder), scanned, labelled and streamed (StreamingDataset) through
imagenet.py's transform.
"""

from __future__ import annotations

import functools
import os

import numpy as np
from absl import logging
from PIL import Image

from bag_jax.data.imagenet import config_image_size, imagenet_class_ids, imagenet_info, log_streaming, read_image
from bag_jax.data.types import StreamingDataset, share_bounds

# torchvision's ImageFolder takes files with these extensions, in any case (datasets/folder.py).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


def _image_files(folder: str) -> list[str]:
    """The image files anywhere under `folder` (hidden files and folders skipped), sorted."""
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith('.')]
        found += [os.path.join(parent, f) for f in files
                  if not f.startswith('.') and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def _scan_imagefolder(root) -> tuple[list[str], np.ndarray, int]:
    """Lists an image folder: (paths, int32 labels, num_classes), class-major in sorted order.

    Classes are the sorted subfolder names. When every one of them is an ILSVRC2012 WordNet id,
    the label is its index among the 1000 (so a folder with some of the classes still scores
    against a 1000-way network) and num_classes is 1000; otherwise labels are 0..K-1.
    """
    if root is None:
        raise ValueError("data.name='imagefolder' needs data.imagefolder_dir: a folder with one subfolder of "
                         'images per class (ImageNet: val/n01440764/ILSVRC2012_val_00000293.JPEG, ...).')
    root = os.fspath(root)
    where = f'data.imagefolder_dir={root!r}'
    if not os.path.isdir(root):
        raise FileNotFoundError(f'{where}: no such directory. Point it at a folder with one subfolder of images '
                                'per class (ImageNet: val/n01440764/ILSVRC2012_val_00000293.JPEG, ...).')
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
    if not classes:
        loose = [f for f in os.listdir(root) if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
        what = f'its {len(loose)} images lie directly in it' if loose else 'it is empty'
        raise ValueError(f'{where} holds no class folders ({what}): put the images of each class in a subfolder '
                         'named after the class (ImageNet: its WordNet id, val/n01440764/..., as torchvision\'s '
                         'ImageFolder reads them). ILSVRC2012_img_val.tar unpacks flat: sort its images into '
                         "class folders first, or use data.name='imagenet2012', which labels them itself.")
    wnid_index = {w: i for i, w in enumerate(imagenet_class_ids())}
    if all(c in wnid_index for c in classes):
        labels_of, num_classes = [wnid_index[c] for c in classes], len(wnid_index)
    else:
        if all(len(c) == 9 and c[0] == 'n' and c[1:].isdigit() for c in classes):
            logging.warning('%s: the folders look like WordNet ids, but %s are not ILSVRC2012 classes: labels are '
                            '0..%d over the sorted folder names, not the 1000 ImageNet classes.', where,
                            [c for c in classes if c not in wnid_index][:5], len(classes) - 1)
        labels_of, num_classes = list(range(len(classes))), len(classes)
    paths, labels, empty = [], [], []
    for name, label in zip(classes, labels_of):
        files = _image_files(os.path.join(root, name))
        if not files:
            empty.append(name)
        paths += files
        labels += [label] * len(files)
    if empty:
        raise ValueError(f'{where}: the class folder(s) {", ".join(empty[:5])}{" ..." if len(empty) > 5 else ""} '
                         f'hold no image file ({", ".join(IMAGE_EXTENSIONS)}, in any case, at any depth): add '
                         'their images, or remove the folders.')
    return paths, np.asarray(labels, np.int32), num_classes


def _read_imagefolder_item(item: tuple[str, int], *, root: str, image_size: int) -> tuple[np.ndarray, int]:
    path, label = item
    try:
        return read_image(path, image_size), label
    except (OSError, ValueError, Image.DecompressionBombError) as e:   # UnidentifiedImageError is an OSError
        raise ValueError(f'data.imagefolder_dir={root!r}: cannot read the image {path!r} ({type(e).__name__}: '
                         f'{e}). Replace or delete the file: every file with an image extension in a class '
                         'folder is evaluated.') from e


def _load_imagefolder(name: str, root, image_size: int, process_index: int,
                      process_count: int) -> StreamingDataset:
    paths, labels, num_classes = _scan_imagefolder(root)
    start, stop = share_bounds(len(paths), process_index, process_count)
    share = list(zip(paths[start:stop], labels[start:stop].tolist()))
    return StreamingDataset(
        info=imagenet_info(name, image_size, num_classes), num_test_total=len(paths),
        num_test_local=len(share), test_items=lambda: iter(share),
        load_item=functools.partial(_read_imagefolder_item, root=os.fspath(root), image_size=image_size))


def load_imagefolder(name: str, data_config, process_index: int, process_count: int) -> StreamingDataset:
    """`data_config.imagefolder_dir`, one folder of images per class, cropped to `data_config.image_size`."""
    image_size = config_image_size(getattr(data_config, 'image_size', None))
    ds = _load_imagefolder(name, getattr(data_config, 'imagefolder_dir', None), image_size, process_index,
                           process_count)
    log_streaming(ds, process_index, process_count)
    return ds

"""On-device preprocessing, pure and jit-able: normalize (ToTensor's /255 and the dataset's
mean/std) and augment (CIFAR's padded random crop and flip).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bag_jax.data.types import AUGMENTATIONS, DatasetInfo

_CROP_PADDING = 4      # torchvision RandomCrop(32, padding=4), the usual CIFAR recipe


def normalize(images, info: DatasetInfo) -> jax.Array:
    """Returns float32 (images / 255 - mean) / std, of the shape of `images` (..., H, W, C).

    Takes numpy or jnp uint8 arrays, inside or outside jit.
    """
    images = jnp.asarray(images)
    if images.shape[-1] != len(info.mean):
        raise ValueError(f'normalize: the images have {images.shape[-1]} channels, dataset '
                         f'{info.name!r} has {len(info.mean)}.')
    mean = jnp.asarray(info.mean, jnp.float32)
    std = jnp.asarray(info.std, jnp.float32)
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def augment(rng: jax.Array, images, kind: str) -> jax.Array:
    """Returns augmented images, of the shape (N, H, W, C) and dtype of `images`.

    Apply it to raw images, before `normalize`, so that the padding is black as in torchvision's
    RandomCrop(padding=4).

    Args:
        rng: a PRNG key; each image gets its own key split from it.
        images: (N, H, W, C).
        kind: 'none' (identity) or 'crop_flip' (per image: pad 4 zero pixels on each side, crop
            H x W at an offset drawn uniformly from {0..8}^2, then flip left-right with
            probability 1/2). A Python string: static under jit.
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f'augment kind={kind!r}; allowed: {", ".join(AUGMENTATIONS)}.')
    images = jnp.asarray(images)
    if kind == 'none':
        return images
    return jax.vmap(_crop_flip)(jax.random.split(rng, images.shape[0]), images)


def _crop_flip(key: jax.Array, image: jax.Array) -> jax.Array:
    p = _CROP_PADDING
    key_y, key_x, key_flip = jax.random.split(key, 3)
    padded = jnp.pad(image, ((p, p), (p, p), (0, 0)))
    dy = jax.random.randint(key_y, (), 0, 2 * p + 1)
    dx = jax.random.randint(key_x, (), 0, 2 * p + 1)
    crop = jax.lax.dynamic_slice(padded, (dy, dx, 0), image.shape)
    return jnp.where(jax.random.bernoulli(key_flip), crop[:, ::-1], crop)

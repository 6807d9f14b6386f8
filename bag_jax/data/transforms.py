"""On-device preprocessing, pure and jit-able: normalize (ToTensor's /255 and the dataset's
mean/std), augment (CIFAR's padded random crop and flip) and SynQ's Gaussian low-pass filter.
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


def gaussian_low_pass_mask(height: int, width: int, d0: float) -> jax.Array:
    """SynQ's frequency mask exp(-d^2 / (2 d0^2)), (height, width) float32, in the centred
    (fftshift) layout (SynQ src/trainer_direct.py:168-176).

    d is the distance of index (i, j) from (height // 2, width // 2), where fftshift puts the zero
    frequency for even and odd sizes alike; so the zero frequency passes unchanged, and for even
    sizes the mask is not symmetric (frequency -n/2 has no +n/2 partner). At the corner index
    (0, 0): 0.53 for 32x32 with d0=20, 0.96 with d0=80, 0.14 for 224x224 with d0=80.
    """
    if not d0 > 0:
        raise ValueError(f'low-pass filter d0={d0!r}; it must be positive.')
    y = jnp.arange(height)[:, None] - height // 2
    x = jnp.arange(width)[None, :] - width // 2
    # SynQ squares integers and divides in float32.
    d_square = (y * y + x * x).astype(jnp.float32)
    return jnp.exp(-d_square / jnp.float32(2 * d0**2))


def low_pass_filter(images: jax.Array, d0: float) -> jax.Array:
    """SynQ's Gaussian low-pass filter of float images (N, H, W, C), per image and channel
    (SynQ src/trainer_direct.py:161-184, which applies it to every batch of its fixed
    synthetic pool, d0=80 by default, src/main_direct.py:622).

    2-D FFT over (H, W), fftshift, times `gaussian_low_pass_mask(H, W, d0)`, ifftshift, inverse
    FFT, real part. A constant image passes unchanged. Returns an array of the shape and dtype
    of `images`.
    """
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f'low_pass_filter takes images (N, H, W, C); got shape {images.shape}.')
    axes = (1, 2)
    mask = gaussian_low_pass_mask(images.shape[1], images.shape[2], d0)[None, :, :, None]
    spectrum = jnp.fft.fftshift(jnp.fft.fft2(images, axes=axes), axes=axes) * mask
    filtered = jnp.fft.ifft2(jnp.fft.ifftshift(spectrum, axes=axes), axes=axes).real
    return filtered.astype(images.dtype)

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
        kind: 'none' (identity), 'crop_flip' (per image: pad 4 zero pixels on each side, crop
            H x W at an offset drawn uniformly from {0..8}^2, then flip left-right with
            probability 1/2) or 'resized_crop_flip' (HAST's and SynQ's augmentation of their
            synthetic pool: `random_resized_crop`, then the flip). A Python string: static
            under jit.
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f'augment kind={kind!r}; allowed: {", ".join(AUGMENTATIONS)}.')
    images = jnp.asarray(images)
    if kind == 'none':
        return images
    crop = _crop_flip if kind == 'crop_flip' else _resized_crop_flip
    return jax.vmap(crop)(jax.random.split(rng, images.shape[0]), images)


def _crop_flip(key: jax.Array, image: jax.Array) -> jax.Array:
    p = _CROP_PADDING
    key_y, key_x, key_flip = jax.random.split(key, 3)
    padded = jnp.pad(image, ((p, p), (p, p), (0, 0)))
    dy = jax.random.randint(key_y, (), 0, 2 * p + 1)
    dx = jax.random.randint(key_x, (), 0, 2 * p + 1)
    crop = jax.lax.dynamic_slice(padded, (dy, dx, 0), image.shape)
    return jnp.where(jax.random.bernoulli(key_flip), crop[:, ::-1], crop)


# torchvision's RandomResizedCrop(scale=(0.5, 1.0)), HAST main_direct.py:116-122, SynQ src/main_direct.py:180.
RESIZED_CROP_SCALE = (0.5, 1.0)
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)


def random_resized_crop(key: jax.Array, image: jax.Array, scale=RESIZED_CROP_SCALE,
                        ratio=RESIZED_CROP_RATIO) -> jax.Array:
    """torchvision's RandomResizedCrop of one image (H, W, C) back to (H, W), bilinear.

    The crop covers a fraction of the area drawn uniformly from `scale`, its aspect ratio drawn
    log-uniformly from `ratio`; width round(sqrt(area * ratio)), height round(sqrt(area / ratio)),
    at an offset drawn uniformly where it fits. torchvision redraws up to 10 times when the box
    does not fit and then falls back to a centre crop; here the one draw is clipped to the image
    instead (a box that does not fit is at most 1/0.75 = 1.33 too long on one side). The crop is
    resized with half-pixel centres (F.interpolate's bilinear, align_corners=False; a crop is
    never larger than the image, so antialiasing does not apply).
    """
    height, width = image.shape[0], image.shape[1]
    area_key, ratio_key, y_key, x_key = jax.random.split(key, 4)
    area = height * width * jax.random.uniform(area_key, (), minval=scale[0], maxval=scale[1])
    log_ratio = jax.random.uniform(ratio_key, (), minval=jnp.log(ratio[0]), maxval=jnp.log(ratio[1]))
    aspect = jnp.exp(log_ratio)
    w = jnp.clip(jnp.round(jnp.sqrt(area * aspect)), 1, width)
    h = jnp.clip(jnp.round(jnp.sqrt(area / aspect)), 1, height)
    top = jnp.floor(jax.random.uniform(y_key, ()) * (height - h + 1))
    left = jnp.floor(jax.random.uniform(x_key, ()) * (width - w + 1))
    scale_hw = jnp.stack([height / h, width / w])
    # Output pixel centre o + 0.5 samples input coordinate (o + 0.5 - translation) / scale.
    return jax.image.scale_and_translate(image, image.shape, (0, 1), scale_hw, -jnp.stack([top, left]) * scale_hw,
                                         'linear', antialias=False)


def _resized_crop_flip(key: jax.Array, image: jax.Array) -> jax.Array:
    crop_key, flip_key = jax.random.split(key)
    crop = random_resized_crop(crop_key, image)
    return jnp.where(jax.random.bernoulli(flip_key), crop[:, ::-1], crop)


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

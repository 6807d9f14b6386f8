"""The reference fake quantizer written again in numpy, for the tests of the quantizer and of
the quantized networks (tests/test_quant.py, test_models.py, test_imagenet_models.py). Not a test
module: test modules import no other."""

import flax
import jax
import numpy as np


def numpy_reference(x, lo, hi, bits):
    """The reference AsymmetricQuantFunction, written again in numpy float32."""
    x, lo, hi = (np.asarray(a, np.float32) for a in (x, lo, hi))
    n = np.float32(2**bits - 1)
    scale = n / np.maximum(hi - lo, np.float32(1e-8))
    zp = np.round(scale * lo) + np.float32(2**(bits - 1))
    q = np.clip(np.round(scale * x - zp), -2**(bits - 1), 2**(bits - 1) - 1)
    return (q + zp) / scale


def quantize_kernels_numpy(params, bits, names=('kernel',)):
    """Every kernel quantized per output channel (the last axis) by the numpy reference."""
    flat = flax.traverse_util.flatten_dict(jax.tree.map(np.asarray, params))
    out = {}
    for path, w in flat.items():
        if path[-1] in names:
            cols = w.reshape(-1, w.shape[-1])
            q = np.stack([numpy_reference(cols[:, c], cols[:, c].min(), cols[:, c].max(), bits)
                          for c in range(cols.shape[1])], axis=-1)
            w = q.reshape(w.shape)
        out[path] = w
    return flax.traverse_util.unflatten_dict(out)

"""Sizes and CPU latency of an exported ResNet-20 student (CIFAR-100 shapes, random weights): the
the table in docs/deployment.md.

    JAX_PLATFORMS=cpu python bench/export_bench.py [--repeats=20]

For W3A3, W4A4 and W5A5: the kernels' bytes as float32 and packed, the weights.npz size, and the
median latency of the fake-quantized student in float (jit of the Flax model) against the
integer inference (jit of integer_inference.make_forward) at batch 1 and 128. Random weights
with activation ranges calibrated on random images: sizes and speed do not depend on the values.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--repeats', type=int, default=20)
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bag_jax import data, export, integer_inference
    from bag_jax.quant import QuantSpec
    from bag_jax.models import ResNetCifar

    info = data.cifar_info('cifar100')
    rows = []
    for bits in (3, 4, 5):
        model = ResNetCifar(num_classes=100, depth=20, quant=QuantSpec(bits, bits))
        variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
        rng = np.random.default_rng(0)
        for _ in range(4):
            images = rng.integers(0, 256, (64, 32, 32, 3), np.uint8)
            _, stats = model.apply(variables, data.normalize(images, info), calibrate=True, mutable=['quant_stats'])
            variables = {**variables, **stats}
        meta = {'kind': 'student', 'arch': 'resnet_cifar', 'depth': 20, 'num_classes': 100, 'data': info.to_dict(),
                'quant': {'w_bits': bits, 'a_bits': bits}}
        arrays = integer_inference.integer_form(model, variables)
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, export.WEIGHTS_FILE)
            packed = export.pack(arrays, meta)
            np.savez(path, **packed)
            npz_bytes = os.path.getsize(path)
        kernels = [name[:-len('/q')] for name in arrays if name.endswith('/q')]
        float32_bytes = sum(4 * arrays[f'{layer}/q'].size for layer in kernels)
        packed_bytes = sum(packed[f'{layer}/packed'].nbytes for layer in kernels)
        fake = jax.jit(lambda x: model.apply(variables, data.normalize(x, info)))
        integer = jax.jit(integer_inference.make_forward(arrays, meta))
        row = {'bits': bits, 'float32_kernel_bytes': float32_bytes, 'packed_kernel_bytes': packed_bytes,
               'weights_npz_bytes': npz_bytes}
        for batch in (1, 128):
            images = rng.integers(0, 256, (batch, 32, 32, 3), np.uint8)
            for name, fn in (('float', fake), ('integer', integer)):
                fn(images).block_until_ready()
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    fn(images).block_until_ready()
                    times.append(time.perf_counter() - start)
                row[f'{name}_ms_batch{batch}'] = 1000 * statistics.median(times)
        print(row, flush=True)
        rows.append(row)
    print(f'\n{jax.devices()[0].device_kind}, jax {jax.__version__}, median of {args.repeats}\n')
    print('| bits | kernels float32 | kernels packed | weights.npz | float batch 1 | integer batch 1 | '
          'float batch 128 | integer batch 128 |')
    print('| --- | --- | --- | --- | --- | --- | --- | --- |')
    for r in rows:
        print(f'| W{r["bits"]}A{r["bits"]} | {r["float32_kernel_bytes"]:,} B | {r["packed_kernel_bytes"]:,} B | '
              f'{r["weights_npz_bytes"]:,} B | {r["float_ms_batch1"]:.2f} ms | {r["integer_ms_batch1"]:.2f} ms | '
              f'{r["float_ms_batch128"]:.1f} ms | {r["integer_ms_batch128"]:.1f} ms |')


if __name__ == '__main__':
    main()

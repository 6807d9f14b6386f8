"""CPU latency of an exported student: onnxruntime (model.onnx, integer, against the float ONNX
network of the same shapes) and JAX (model.jax, against the fake-quantized student under jit),
at batch 1 and 64, for ResNet-20 (CIFAR-100, 32x32) and ResNet-18 (ImageNet, 224x224). The
table in docs/deployment.md and bench/NOTES.md.

    JAX_PLATFORMS=cpu python bench/onnx_latency.py [--bits=4] [--repeats=10] [--resnet18=full|wd4]

Random weights (sizes and speed do not depend on the values), activation ranges calibrated on
random images. "onnxruntime float" is `onnx_model.build(..., float_baseline=True)`: float32
convolutions with the BN-folded kernels, no activation quantization; "onnxruntime integer" is
model.onnx as the export writes it (ConvInteger); "QLinearConv form" is
`onnx_model.build(..., qlinear=True)`, where onnxruntime fuses the conv-BN-ReLU-QuantAct blocks
into QLinearConv (faster, but its int32 bias rounds: not the student's numbers); "model.jax" is the jax.export module the export writes
(integer arithmetic for ResNet-20, float32 on dequantized kernels for ResNet-18); "JAX float"
the fake-quantized student under jax.jit. Median of --repeats calls after one warm-up call;
onnxruntime with every graph optimization on and its default threads. Prints a Markdown table
and the machine (the CPU model from /proc/cpuinfo, the cores).
"""

import argparse
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def median_ms(fn, images, repeats: int) -> float:
    fn(images)                       # compiles (jax) or allocates (onnxruntime)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(images)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def student(name: str, bits: int, resnet18: str):
    """(model, variables, meta) of a random-weight student, ranges calibrated on random images."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from bag_jax import data, models
    from bag_jax.quant import QuantSpec
    if name == 'resnet20':
        description, info = models.PYTORCHCV_NETWORKS['resnet20_cifar100'], data.cifar_info('cifar100')
    else:
        description = dict(models.PYTORCHCV_NETWORKS['resnet18'])
        if resnet18 == 'wd4':   # the test fixture's widths (tests/fixtures/imagenet/README.md)
            description.update(init_channels=16, channels=((16, 16), (32, 32), (64, 64), (128, 128)))
        size = 224
        info = data.DatasetInfo('imagenet2012', 1000, (size, size, 3), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                                'none')
    model = models.build(description, QuantSpec(bits, bits))
    height, width, channels = info.image_shape
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, height, width, channels)))
    rng = np.random.default_rng(0)
    calibrate = jax.jit(lambda v, x: model.apply(v, data.normalize(x, info), calibrate=True, mutable=['quant_stats']))
    for _ in range(2):
        images = rng.integers(0, 256, (8, height, width, channels), np.uint8)
        _, stats = calibrate(variables, images)
        variables = {**variables, **stats}
    meta = {**models.describe(model), 'kind': 'student', 'num_classes': model.num_classes, 'data': info.to_dict(),
            'quant': {'w_bits': bits, 'a_bits': bits, 'range_rule': 'reference', 'ste': 'identity'}}
    return model, variables, meta, info


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--bits', type=int, default=4)
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--resnet18', choices=('full', 'wd4'), default='full')
    args = parser.parse_args()
    import jax
    import numpy as np
    import onnxruntime
    from jax import export as jax_export
    from bag_jax import data, export, integer_inference, onnx_model

    rows = []
    for name in ('resnet20', 'resnet18'):
        model, variables, meta, info = student(name, args.bits, args.resnet18)
        arrays = integer_inference.integer_form(model, variables)
        integer = onnx_model.session(onnx_model.build(arrays, meta).SerializeToString())
        floating = onnx_model.session(onnx_model.build(arrays, meta, float_baseline=True).SerializeToString())
        qlinear = onnx_model.session(onnx_model.build(arrays, meta, qlinear=True).SerializeToString())
        shipped = jax_export.deserialize(export.serialize_forward(arrays, meta))
        jax_model = jax.jit(shipped.call)
        fake = jax.jit(lambda v, x: model.apply(v, data.normalize(x, info)))
        runners = {
            'onnxruntime float': lambda x: floating.run(None, {onnx_model.INPUT: x})[0],
            'onnxruntime integer (model.onnx)': lambda x: integer.run(None, {onnx_model.INPUT: x})[0],
            'onnxruntime QLinearConv form (not exact)': lambda x: qlinear.run(None, {onnx_model.INPUT: x})[0],
            'model.jax': lambda x: jax_model(x).block_until_ready(),
            'JAX float (fake-quant student, jit)': lambda x: fake(variables, x).block_until_ready(),
        }
        for batch in (1, 64):
            images = np.random.default_rng(batch).integers(0, 256, (batch, *info.image_shape), np.uint8)
            row = {'network': name, 'batch': batch}
            for column, fn in runners.items():
                row[column] = median_ms(fn, images, args.repeats)
            print(row, flush=True)
            rows.append(row)
    columns = list(runners)
    widths = {'resnet20': 'ResNet-20, 32x32, 100 classes',
              'resnet18': 'ResNet-18, 224x224' + (' (fixture widths 16-128)' if args.resnet18 == 'wd4' else '')}
    print(f'\n{cpu_model()}, {os.cpu_count()} cores; onnxruntime {onnxruntime.__version__}, jax {jax.__version__}; '
          f'W{args.bits}A{args.bits}, random weights; median of {args.repeats} calls, ms\n')
    print('| network | batch | ' + ' | '.join(columns) + ' |')
    print('| --- | --- | ' + ' | '.join('---' for _ in columns) + ' |')
    for r in rows:
        print(f'| {widths[r["network"]]} | {r["batch"]} | ' + ' | '.join(f'{r[c]:.2f}' for c in columns) + ' |')


if __name__ == '__main__':
    main()

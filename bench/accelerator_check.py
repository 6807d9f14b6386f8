"""The accelerator check: the real BAG W3A3 CIFAR-100 step at batch 16 and 200 for 1, 8 and 32
runs in one program (num_seeds: bag_jax.sweep spreads them over the devices), and the W4A4 ImageNet steps (ResNet-18, ResNet-50, MobileNetV2 at 224x224, batch 16),
with the projected wall time of a full 400-epoch x 200-iteration run. First, model.jax on the
accelerator: a W4A4 ResNet-20 student (random weights) exported as `python -m bag_jax.export`
writes it, run on the accelerator and on the host CPU (integer kernels there): agreement of
their predictions, their largest logit difference and the accelerator's latency.

    python bench/accelerator_check.py [--steps=50] [--repeats=3] [--method=bag]

Needs no data (random teacher). Prints one line per setting as it finishes, then a Markdown table.
The projection counts training steps only (not the 400 test-set evaluations or compilation).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from bag_jax import bench, settings  # noqa: E402
from configs import cifar100_w3a3, imagenet_mobilenetv2_w4a4, imagenet_resnet18_w4a4, imagenet_resnet50_w4a4  # noqa: E402,E501

_STEPS = flags.DEFINE_integer('steps', 50, 'Iterations per timed call.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls.')
_METHOD = flags.DEFINE_string('method', 'bag', 'gdfq, adadfq or bag.')
# (label, config module, batch, seeds); the ImageNet teachers are the zoo architectures with
# random weights (no download, no data).
SETTINGS = [('ResNet-20 / CIFAR-100 W3A3', cifar100_w3a3, 16, 1), ('ResNet-20 / CIFAR-100 W3A3', cifar100_w3a3, 16, 8),
            ('ResNet-20 / CIFAR-100 W3A3', cifar100_w3a3, 16, 32),
            ('ResNet-20 / CIFAR-100 W3A3', cifar100_w3a3, 200, 1), ('ResNet-20 / CIFAR-100 W3A3', cifar100_w3a3, 200, 8),
            ('ResNet-20 / CIFAR-100 W3A3', cifar100_w3a3, 200, 32),
            ('ResNet-18 / ImageNet W4A4', imagenet_resnet18_w4a4, 16, 1),
            ('MobileNetV2 / ImageNet W4A4', imagenet_mobilenetv2_w4a4, 16, 1),
            ('ResNet-50 / ImageNet W4A4', imagenet_resnet50_w4a4, 16, 1)]


def check_exported_student() -> None:
    import time

    import jax
    import numpy as np
    from jax import export as jax_export

    from bag_jax import export, integer_inference
    from bench.onnx_latency import student
    model, variables, meta, info = student('resnet20', 4, 'wd4')
    arrays = integer_inference.integer_form(model, variables)
    shipped = jax_export.deserialize(export.serialize_forward(arrays, meta))
    images = np.random.default_rng(0).integers(0, 256, (64, *info.image_shape), np.uint8)
    call = jax.jit(shipped.call)
    host = np.asarray(call(jax.device_put(images, jax.devices('cpu')[0])))
    accelerator = jax.devices()[0]
    on_device = np.asarray(call(jax.device_put(images, accelerator)))
    latency = {}
    for batch in (1, 64):
        x = jax.device_put(images[:batch], accelerator)
        call(x).block_until_ready()
        times = []
        for _ in range(20):
            start = time.perf_counter()
            call(x).block_until_ready()
            times.append(time.perf_counter() - start)
        latency[batch] = 1e3 * float(np.median(times))
    print(f'model.jax on {accelerator.device_kind}: agreement with the CPU\'s integer run '
          f'{np.mean(host.argmax(1) == on_device.argmax(1)):.4f} of 64 random images, largest logit difference '
          f'{float(np.abs(host - on_device).max()):.3g} (logits up to {float(np.abs(host).max()):.3g}); '
          f'latency batch 1: {latency[1]:.3f} ms, batch 64: {latency[64]:.3f} ms', flush=True)


def main(argv):
    try:
        check_exported_student()
    except Exception as error:    # the timing table still runs; the failure is the finding
        print(f'model.jax on the accelerator FAILED: {type(error).__name__}: {str(error)[:2000]}', flush=True)
    rows = []
    for label, module, batch, seeds in SETTINGS:
        c = module.get_config(_METHOD.value)
        c.batch_size, c.num_seeds = batch, seeds
        r = bench.run_bench(settings.parse(c), _STEPS.value, _REPEATS.value)
        iterations = c.epochs * c.iters_per_epoch    # run_bench leaves the config as it was
        r['projected_full_run_min'] = r['step_s_median'] * iterations / 60
        r['label'] = label
        print(r, flush=True)
        rows.append(r)
    print(f'\n{rows[0]["device_kind"]} x {rows[0]["device_count"]}, {_METHOD.value}\n')
    print('| network / data | batch | runs | s / iteration (all runs) | s / iteration / run | images / s | TFLOP/s '
          '| device peak memory | full run (epochs x iters_per_epoch, all runs) |')
    print('| --- | --- | --- | --- | --- | --- | --- | --- | --- |')
    for r in rows:
        mem = f'{r["device_peak_bytes"] / 2**30:.2f} GiB' if r['device_peak_bytes'] else 'n/a'
        print(f'| {r["label"]} | {r["batch_size"]} | {r["num_runs"]} | {r["step_s_median"]:.4f} | '
              f'{r["step_s_per_run"]:.4f} | {r["images_per_s"]:.0f} | {r["flops_per_s"] / 1e12:.2f} | {mem} | '
              f'{r["projected_full_run_min"]:.1f} min |')


if __name__ == '__main__':
    app.run(main)

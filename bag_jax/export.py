"""Deployable students: packed integer weights and a portable integer-inference module.

    python -m bag_jax.export --checkpoint=W/student --out=OUT [--format=jax|onnx|all]
                             [--npz_path=F.npz | --tfds_dir=DIR | ...]

writes, for a student quantized at w_bits, a_bits <= 8 (--format: 'jax', the default,
weights.npz and model.jax; 'onnx', weights.npz and model.onnx; 'all', the three):

  OUT/weights.npz   the integer form (`integer_inference.integer_form`), every kernel's grid
                    indices packed at its bit-width (`pack_bits`: eight 3-bit values in three
                    bytes) as '<layer>/packed' with '<layer>/shape' and '<layer>/bits', beside the
                    per-channel zero points and scales, the activation ranges, BatchNorm and the
                    classifier bias as float32; '__meta__' holds the checkpoint's metadata as
                    JSON. Plain arrays: np.load(..., allow_pickle=False) reads it.
  OUT/model.jax     `jax.export` of the integer inference built from weights.npz as written
                    (resnet_cifar; the ImageNet architectures compute in float32 on the
                    dequantized kernels, `integer_inference.dequantized_forward`):
                    uint8 images (B, H, W, C) in, float32 logits out, symbolic batch, lowered
                    for CPU, CUDA and TPU. Needs only jax:
                        from jax import export
                        model = export.deserialize(open('OUT/model.jax', 'rb').read())
                        logits = model.call(images_uint8)
  OUT/model.onnx    the same student as an ONNX graph (opset 13) that onnxruntime runs with
                    integer convolutions and an integer classifier (`bag_jax.onnx_model`, which
                    says what is integer): uint8 images (batch, H, W, C) in, float32 logits out.
                    Needs the onnx and onnxruntime packages (pip install "bag-jax[onnx]");
                    without them the export writes the jax files and says so in one line.
  OUT/export.json   architecture, bit-widths, byte sizes (float32 weights against packed), and
                    the agreement of the integer model (model.jax itself) with the fake-quantized
                    student on the test split of the data the student was quantized with (as
                    student.json records them; --npz_path, --tfds_dir, --imagefolder_dir,
                    --digits_test_fraction, --image_size override), both models normalizing
                    with the student's statistics: predicted-class agreement, both top-1, the
                    max and mean absolute logit differences; the same for model.onnx run in
                    onnxruntime ('onnx': also the operators onnxruntime runs after its graph
                    optimization); for model.jax the JAX version, the jax.export serialization
                    and calling-convention versions, and until when jax.export's compatibility
                    guarantee covers loading it ('jax_export', `jax_export_info`).

Everything is written into OUT.partial/ and renamed to OUT when complete; an OUT that holds
something other than an earlier export is never replaced.
"""

from __future__ import annotations

import argparse
import calendar
import datetime
import json
import os
import shutil
import sys
from typing import Any, Optional

import numpy as np

from bag_jax import checkpoint, data, integer_inference, models

WEIGHTS_FILE = 'weights.npz'
MODEL_FILE = 'model.jax'
ONNX_FILE = 'model.onnx'
FORMATS = ('jax', 'onnx', 'all')
ONNX_MISSING = ('model.onnx not written: ONNX export needs the onnx and onnxruntime packages '
                '(pip install "bag-jax[onnx]")')
# jax.export's backward-compatibility guarantee: a serialized module loads in the JAX versions
# released up to 6 months after the one that wrote it (jax/_src/internal_test_util/
# export_back_compat_test_util.py: "we have to guarantee 6 months of backward compatibility for
# the JAX serialized format"); older JAX versions load it only about a month back (the StableHLO
# target is >= 4 weeks old, JAX's custom calls 3 weeks: jax/_src/export/_export.py).
JAX_EXPORT_GUARANTEE_MONTHS = 6
REPORT_FILE = 'export.json'
META_KEY = '__meta__'
PLATFORMS = ('cpu', 'cuda', 'tpu')
# The agreement the integer model must reach with the fake-quantized student (issue 12).
AGREEMENT_BAR = 0.995


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Packs unsigned integers below 2^bits, `bits` bits each, least significant bit first, into
    uint8: ceil(n * bits / 8) bytes for n values."""
    values = np.asarray(values).reshape(-1).astype(np.uint16)
    if values.size and int(values.max()) >= 2**bits:
        raise ValueError(f'pack_bits: a value {int(values.max())} does not fit in {bits} bits.')
    planes = (values[:, None] >> np.arange(bits, dtype=np.uint16)) & 1
    return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder='little')


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The inverse of `pack_bits`: `count` unsigned values (uint16)."""
    planes = np.unpackbits(np.asarray(packed, np.uint8), count=count * bits, bitorder='little').reshape(count, bits)
    return (planes.astype(np.uint16) << np.arange(bits, dtype=np.uint16)).sum(axis=1, dtype=np.uint16)


def pack(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """The content of weights.npz for an integer form: every '<layer>/q' (int8 grid indices at
    w_bits) becomes '<layer>/packed' (q + 2^(bits-1), unsigned, `pack_bits`), '<layer>/shape' and
    '<layer>/bits'; the rest is kept; META_KEY holds `meta` as JSON."""
    w_bits, _ = integer_inference.check_student(meta, 'the student')
    out = {META_KEY: np.array(json.dumps(meta, sort_keys=True))}
    for name, value in arrays.items():
        if name.endswith('/q'):
            layer = name[:-2]
            out[f'{layer}/packed'] = pack_bits(value.astype(np.int16) + 2**(w_bits - 1), w_bits)
            out[f'{layer}/shape'] = np.asarray(value.shape, np.int64)
            out[f'{layer}/bits'] = np.asarray(w_bits, np.int64)
        else:
            out[name] = value
    return out


def unpack(stored: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The inverse of `pack`: (the integer form, the metadata)."""
    meta = json.loads(str(stored[META_KEY]))
    arrays = {}
    for name, value in stored.items():
        if name == META_KEY or name.endswith(('/shape', '/bits')):
            continue
        if name.endswith('/packed'):
            layer = name[:-len('/packed')]
            shape, bits = tuple(int(s) for s in stored[f'{layer}/shape']), int(stored[f'{layer}/bits'])
            values = unpack_bits(value, bits, int(np.prod(shape))).astype(np.int16) - 2**(bits - 1)
            arrays[f'{layer}/q'] = values.astype(np.int8).reshape(shape)
        else:
            arrays[name] = value
    return arrays, meta


def load_weights(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reads an exported weights.npz: (the integer form, the metadata)."""
    with np.load(path, allow_pickle=False) as stored:
        return unpack({name: stored[name] for name in stored.files})


def serialize_forward(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> bytes:
    """`jax.export` of `integer_inference.make_forward`, uint8 images with a symbolic batch."""
    import jax
    from jax import export as jax_export
    height, width, channels = meta['data']['image_shape']
    batch, = jax_export.symbolic_shape('batch')
    forward = jax.jit(integer_inference.make_forward(arrays, meta))
    exported = jax_export.export(forward, platforms=PLATFORMS)(
        jax.ShapeDtypeStruct((batch, height, width, channels), np.uint8))
    return exported.serialize()


def jax_export_info(serialized: bytes, today: Optional[datetime.date] = None) -> dict[str, Any]:
    """What model.jax depends on: the JAX version that wrote it, the jax.export serialization
    version (the schema of the bytes) and calling-convention version, the day it was written, and
    the day until which JAX releases are guaranteed to load it (JAX_EXPORT_GUARANTEE_MONTHS)."""
    import jax
    from jax import export as jax_export
    try:
        from jax._src.export import serialization
        schema = int(serialization._SERIALIZATION_VERSION)
    except (ImportError, AttributeError):      # private: absent from some JAX version
        schema = None
    today = today or datetime.date.today()
    month = today.month - 1 + JAX_EXPORT_GUARANTEE_MONTHS
    year, month = today.year + month // 12, month % 12 + 1
    day = min(today.day, calendar.monthrange(year, month)[1])
    return {'jax_version': jax.__version__, 'serialization_version': schema,
            'calling_convention_version': jax_export.deserialize(serialized).calling_convention_version,
            'written': today.isoformat(), 'loads_until': datetime.date(year, month, day).isoformat(),
            'guarantee': f'JAX releases up to {JAX_EXPORT_GUARANTEE_MONTHS} months after jax {jax.__version__} load '
                         'model.jax; older ones about a month back; ONNX (model.onnx) is the long-lived format'}


def onnx_missing() -> Optional[str]:
    """None if onnx and onnxruntime import, else the one line ONNX_MISSING."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return ONNX_MISSING
    return None


def agreement(student_apply, integer_apply, dataset, batch_size: int) -> dict[str, Any]:
    """Scores both models on the test split in batches (an ArrayDataset or a streamed one, loaded
    for one process): the share of images where they predict the same class, each one's top-1
    (percent), and the max and mean absolute logit difference."""
    same = correct_student = correct_integer = n = 0
    max_diff, sum_diff, count = 0.0, 0.0, 0
    for x, y, mask in data.eval_batches(dataset, batch_size, process_count=1):
        x, y = x[mask], y[mask]
        if not len(y):
            continue
        fake, integer = np.asarray(student_apply(x)), np.asarray(integer_apply(x))
        same += int(np.sum(fake.argmax(1) == integer.argmax(1)))
        correct_student += int(np.sum(fake.argmax(1) == y))
        correct_integer += int(np.sum(integer.argmax(1) == y))
        diff = np.abs(fake.astype(np.float64) - integer)
        max_diff, sum_diff, count = max(max_diff, float(diff.max())), sum_diff + float(diff.sum()), count + diff.size
        n += len(y)
    if n == 0:
        raise ValueError(f'the test split of {dataset.info.name!r} is empty: there is nothing to measure agreement on.')
    return {'images': n, 'dataset': dataset.info.name, 'prediction_agreement': same / n,
            'student_top1': 100.0 * correct_student / n, 'integer_top1': 100.0 * correct_integer / n,
            'max_abs_logit_diff': max_diff, 'mean_abs_logit_diff': sum_diff / max(count, 1)}


def _prepare_out(out: str) -> str:
    """Checks that OUT can be (re)written; returns the partial directory to write into."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isfile(os.path.join(out, REPORT_FILE)):
        raise ValueError(f'--out {out!r} exists and is not an earlier export: choose a new directory.')
    parent = os.path.dirname(out)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise PermissionError(f'--out {out!r}: cannot write in {parent!r} (missing or not writable).')
    partial = out + checkpoint.PARTIAL_SUFFIX
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    return partial


def export(checkpoint_dir: str, out: str, data_config=None, eval_batch_size: int = 200,
           measure: bool = True, fmt: str = 'jax') -> dict[str, Any]:
    """Exports the student in `checkpoint_dir` to `out` (see the module docstring); returns the
    export.json content. The agreement is measured on the data the student was quantized with
    (as its student.json records them, `checkpoint.data_config_for`); each field of `data_config`
    (name, npz_path, tfds_dir, imagefolder_dir, digits_test_fraction, image_size) that is set
    overrides its recorded value. `measure=False` skips the agreement (for a student whose data is
    not at hand). Both models normalize the images with the student's recorded statistics.
    `fmt` (FORMATS) chooses the files; 'onnx' or 'all' without onnx and onnxruntime installed
    write the jax files instead, and export.json's 'onnx' says why."""
    import jax
    from bag_jax import evaluate
    if fmt not in FORMATS:
        raise ValueError(f'--format={fmt!r} is not allowed: choose one of {", ".join(map(repr, FORMATS))}.')
    missing = onnx_missing() if fmt != 'jax' else None
    write_jax, write_onnx = fmt in ('jax', 'all') or missing is not None, fmt != 'jax' and missing is None
    kind, model, variables, meta = checkpoint.load_model(checkpoint_dir, field='--checkpoint')
    integer_inference.check_student({**meta, 'kind': kind}, f'--checkpoint {checkpoint_dir!r}')
    # The student's own normalization, for the fake-quantized student as for the integer model
    # (`integer_inference.make_forward` reads meta['data']), whatever data score them.
    info = data.DatasetInfo.from_dict(meta['data'])
    dataset = None
    if measure:
        fields, recorded = checkpoint.data_config_for(meta, data_config)
        dataset = evaluate.load_recorded(fields, recorded, os.path.abspath(checkpoint_dir), kind, '--',
                                         process_index=0, process_count=1)
        checkpoint.check_compatible(info, dataset.info, '--checkpoint')
    partial = _prepare_out(out)
    try:
        meta = {**meta, 'kind': kind}
        arrays = integer_inference.integer_form(model, variables)
        packed = pack(arrays, meta)
        np.savez(os.path.join(partial, WEIGHTS_FILE), **packed)
        # model.jax and model.onnx are built from weights.npz as written, so the round trip is
        # part of every export.
        written, _ = load_weights(os.path.join(partial, WEIGHTS_FILE))
        report = {'checkpoint': os.path.abspath(checkpoint_dir), **models.describe(model),
                  'num_classes': meta['num_classes'], 'w_bits': meta['quant']['w_bits'],
                  'a_bits': meta['quant']['a_bits'], 'format': fmt}
        fake = jax.jit(lambda x: model.apply(variables, data.normalize(x, info)))
        if write_jax:
            serialized = serialize_forward(written, meta)
            with open(os.path.join(partial, MODEL_FILE), 'wb') as f:
                f.write(serialized)
            integer = meta['arch'] in integer_inference.INTEGER_ARCHITECTURES
            report.update({'integer_arithmetic': {p: integer and p == 'cpu' for p in PLATFORMS},
                           'platforms': list(PLATFORMS), 'jax_export': jax_export_info(serialized)})
        if write_onnx:
            report['onnx'] = write_onnx_model(written, meta, os.path.join(partial, ONNX_FILE))
        elif missing:
            report['onnx'] = {'written': False, 'reason': missing}
        report.update(sizes(arrays, packed, variables, partial))
        if measure and write_jax:
            from jax import export as jax_export
            with open(os.path.join(partial, MODEL_FILE), 'rb') as f:
                shipped = jax_export.deserialize(f.read())
            report['agreement'] = agreement(fake, shipped.call, dataset, eval_batch_size)
        if measure and write_onnx:
            from bag_jax import onnx_model
            onnx_session = onnx_model.session(os.path.join(partial, ONNX_FILE))
            report['onnx']['agreement'] = agreement(
                fake, lambda x: onnx_session.run(None, {onnx_model.INPUT: np.asarray(x, np.uint8)})[0],
                dataset, eval_batch_size)
        with open(os.path.join(partial, REPORT_FILE), 'w') as f:
            json.dump(report, f, indent=2)
        checkpoint.publish(partial, os.path.abspath(out))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return report


def write_onnx_model(arrays: dict[str, np.ndarray], meta: dict[str, Any], path: str) -> dict[str, Any]:
    """Writes the ONNX model of the integer form `arrays` (`onnx_model.build`) to `path` after
    onnx.checker passes; returns what export.json records of it: versions, the layers computed in
    integers and in float, and the operators onnxruntime runs after its graph optimization."""
    import onnx
    import onnxruntime
    from bag_jax import onnx_model
    model = onnx_model.build(arrays, meta)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    integer, floating = onnx_model.layer_lists(model)
    return {'written': True, 'file': ONNX_FILE, 'opset': onnx_model.OPSET, 'onnx_version': onnx.__version__,
            'onnxruntime_version': onnxruntime.__version__, 'integer_layers': len(integer), 'float_layers': floating,
            'optimized_operators': onnx_model.optimized_operators(path)}


def sizes(arrays: dict[str, np.ndarray], packed: dict[str, np.ndarray], variables,
          directory: str) -> dict[str, int]:
    """Byte sizes: the quantized kernels of the integer form `arrays` as float32 and as `packed`
    (`pack`), the whole float32 model (parameters and BatchNorm statistics), and the files written
    in `directory`."""
    import jax
    kernels = [name[:-len('/q')] for name in arrays if name.endswith('/q')]
    float32_model = sum(4 * np.size(leaf) for leaf in jax.tree.leaves([variables['params'], variables['batch_stats']]))
    return {'float32_kernel_bytes': sum(4 * arrays[f'{layer}/q'].size for layer in kernels),
            'packed_kernel_bytes': sum(packed[f'{layer}/packed'].nbytes for layer in kernels),
            'float32_model_bytes': int(float32_model),
            'weights_npz_bytes': os.path.getsize(os.path.join(directory, WEIGHTS_FILE)),
            **{f'model_{kind}_bytes': os.path.getsize(os.path.join(directory, name))
               for kind, name in (('jax', MODEL_FILE), ('onnx', ONNX_FILE))
               if os.path.isfile(os.path.join(directory, name))}}


def main(argv: Optional[list[str]] = None) -> int:
    """The command line; returns the exit status (errors are one line on stderr, no traceback)."""
    parser = argparse.ArgumentParser(
        prog='python -m bag_jax.export',
        description='Export a quantized student: packed integer weights, a jax.export integer-inference '
                    'module and/or an ONNX model for onnxruntime, and their agreement with the fake-quantized student.')
    parser.add_argument('--checkpoint', required=True, metavar='DIR', help='a student checkpoint (W/student)')
    parser.add_argument('--out', required=True, metavar='OUT', help='the export directory to write')
    parser.add_argument('--format', default='jax', choices=FORMATS, help="jax: weights.npz and model.jax (the default); "
                        "onnx: weights.npz and model.onnx (needs onnx and onnxruntime); all: the three")
    parser.add_argument('--npz_path', default=None, help="score on this npz file's test split (default: the "
                        "one the student was quantized with, as student.json records it)")
    parser.add_argument('--tfds_dir', default=None, help='a prepared tensorflow-datasets directory (CIFAR, ImageNet; '
                        'default: the recorded one)')
    parser.add_argument('--imagefolder_dir', default=None, help='score on this folder of class folders (ImageNet; '
                        'default: the recorded one)')
    parser.add_argument('--digits_test_fraction', type=float, default=None,
                        help='digits: the share held out for testing (default: the recorded one, else 0.25)')
    parser.add_argument('--image_size', type=int, default=None,
                        help='ImageNet-style data: the centre crop (default: the recorded one)')
    parser.add_argument('--eval_batch_size', type=int, default=200)
    parser.add_argument('--no_agreement', action='store_true', help='skip the agreement measurement')
    args = parser.parse_args(argv)
    fields = {k: v for k, v in (('npz_path', args.npz_path), ('tfds_dir', args.tfds_dir),
                                 ('imagefolder_dir', args.imagefolder_dir),
                                 ('digits_test_fraction', args.digits_test_fraction),
                                 ('image_size', args.image_size)) if v is not None}
    if args.npz_path:
        fields['name'] = 'npz'
    if args.imagefolder_dir:
        fields['name'] = 'imagefolder'
    try:
        report = export(args.checkpoint, args.out, fields, args.eval_batch_size, measure=not args.no_agreement,
                        fmt=args.format)
    except (OSError, ValueError, checkpoint.CheckpointError, data.DatasetUnavailableError) as e:
        print(f'{parser.prog}: error: {e}', file=sys.stderr)
        return 1
    out = os.path.abspath(args.out)
    files = [name for name in (MODEL_FILE, ONNX_FILE) if os.path.isfile(os.path.join(out, name))]
    print(f'wrote {out}: {WEIGHTS_FILE} ({report["weights_npz_bytes"]} bytes; kernels {report["packed_kernel_bytes"]} '
          f'bytes packed against {report["float32_kernel_bytes"]} as float32), {", ".join(files)}, {REPORT_FILE}')
    if not report.get('onnx', {}).get('written', True):
        print(report['onnx']['reason'], file=sys.stderr)
    for name, a in ((MODEL_FILE, report.get('agreement')), (ONNX_FILE, report.get('onnx', {}).get('agreement'))):
        if a is None:
            continue
        print(f'{name} against the fake-quantized student on {a["images"]} {a["dataset"]} test images: '
              f'same prediction on {100 * a["prediction_agreement"]:.2f} %, top-1 {a["integer_top1"]:.2f} % against '
              f'{a["student_top1"]:.2f} %, logits differ by at most {a["max_abs_logit_diff"]:.3g} '
              f'(mean {a["mean_abs_logit_diff"]:.3g})')
        if a['prediction_agreement'] < AGREEMENT_BAR:
            print(f'warning: the agreement of {name} is below {100 * AGREEMENT_BAR} %', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())

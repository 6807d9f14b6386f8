"""pytorchcv weights -> a bag-jax teacher checkpoint, without PyTorch.

    python -m bag_jax.convert --pytorchcv resnet20_cifar100-2964-a5322afe.pth.zip --out teachers/r20_c100
    python -m bag_jax.convert --pytorchcv resnet18-0982-0126861b.pth.zip --out teachers/resnet18

The teachers of GDFQ/AdaDFQ/BAG are pytorchcv's `resnet20_cifar100` (docs/algorithms.md 1.1) and, on ImageNet,
`resnet18`, `resnet50` and `mobilenetv2_w1` (docs/imagenet.md 1), with the osmr/imgclsmob zoo
weights. The architecture and its widths are read from the state dict's keys and shapes
(`infer_model`); ImageNet networks get the imagenet2012 data description, CIFAR ones the
dataset in the file name or --dataset. Those files are PyTorch state dicts: the zoo's 2019 files in the legacy
(pre-1.6, non-zip) serialization, newer ones in the zip serialization, and the zoo serves
either wrapped in a `.pth.zip` archive. `read_pth` reads all three with `pickle` alone, so the
project never depends on PyTorch. Its unpickler resolves only the handful of names a state dict
uses (tensor rebuild functions, storage types, OrderedDict), so a file can never run code.

Legacy format: five consecutive pickles and then raw storages,
    magic number, protocol version (1001), system info (byte order),
    the object (tensors refer to storages through persistent ids
        ('storage', StorageType, key, location, numel, view_metadata)),
    the sorted list of storage keys,
    for each key: int64 element count + the storage's bytes.
Zip format: `NAME/data.pkl` holds the object (persistent ids
('storage', StorageType, key, location, numel)) and `NAME/data/KEY` each storage's bytes;
`NAME/byteorder` says 'little' or 'big'.
Tensors are `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`, offset and
stride counted in elements; `_rebuild_tensor_v3` (uint16/32/64, float8) has an untyped byte
storage and an explicit dtype.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import re
import struct
import sys
import tarfile
import zipfile
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from bag_jax import checkpoint, data, models
from bag_jax.models import MobileNetV2, ResNet, ResNetCifar

PTH_EXPECTED = ('a PyTorch state dict saved with torch.save (legacy or zip serialization), '
                'or the model zoo\'s .pth.zip holding one .pth')

# The zoo's CIFAR models: class count, input size and normalization (docs/algorithms.md 1.3).
_DATASETS = data.family('cifar')     # the registry's CIFAR sources (bag_jax/data/sources.py)
IMAGE_SHAPE = (32, 32, 3)
IMAGENET = 'imagenet2012'   # the ImageNet models' data (docs/imagenet.md 6; `data.imagenet_info`)

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c   # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001                 # torch.serialization.PROTOCOL_VERSION

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
    'ComplexFloatStorage': np.complex64, 'ComplexDoubleStorage': np.complex128,
    'UntypedStorage': np.uint8,
}
_TORCH_DTYPES = {
    'float32': np.float32, 'float': np.float32, 'float64': np.float64, 'double': np.float64,
    'float16': np.float16, 'half': np.float16, 'bfloat16': ml_dtypes.bfloat16,
    'int64': np.int64, 'long': np.int64, 'int32': np.int32, 'int': np.int32, 'int16': np.int16,
    'short': np.int16, 'int8': np.int8, 'uint8': np.uint8, 'uint16': np.uint16, 'uint32': np.uint32,
    'uint64': np.uint64, 'bool': np.bool_, 'complex64': np.complex64, 'complex128': np.complex128,
    'float8_e4m3fn': ml_dtypes.float8_e4m3fn, 'float8_e5m2': ml_dtypes.float8_e5m2,
    'float8_e4m3fnuz': ml_dtypes.float8_e4m3fnuz, 'float8_e5m2fnuz': ml_dtypes.float8_e5m2fnuz,
}


# ------------------------------------------------------------------------------------------
# Reading .pth files


class _Storage:
    """A flat storage named by the pickle; its bytes arrive from the archive or after the pickle."""

    def __init__(self, key: str, dtype: np.dtype):
        self.key, self.dtype, self.data = key, np.dtype(dtype), None

    def array(self, dtype: np.dtype) -> np.ndarray:
        if self.data is None:
            raise ValueError(f'storage {self.key!r} has no data in the file')
        if len(self.data) % dtype.itemsize:
            raise ValueError(f'storage {self.key!r} holds {len(self.data)} bytes, not a whole number of {dtype}')
        return np.frombuffer(self.data, dtype=dtype)


class _StorageView:
    """A legacy-format view into a root storage (element offset, element count)."""

    def __init__(self, root: _Storage, offset: int, size: int):
        self.root, self.offset, self.size = root, offset, size
        self.key, self.dtype = root.key, root.dtype

    def array(self, dtype: np.dtype) -> np.ndarray:
        return self.root.array(dtype)[self.offset:self.offset + self.size]


class _Tensor:
    """A tensor waiting for its storage's bytes: (storage, element offset, size, stride, dtype)."""

    def __init__(self, storage, offset, size, stride, dtype=None):
        self.storage, self.offset = storage, offset
        self.size, self.stride = tuple(size), tuple(stride)
        self.dtype = np.dtype(dtype) if dtype is not None else storage.dtype

    def materialize(self, byteorder: str) -> np.ndarray:
        if any(n == 0 for n in self.size):
            return np.zeros(self.size, self.dtype)
        dtype = self.dtype.newbyteorder(byteorder)
        flat = self.storage.array(dtype)
        if self.offset < 0 or any(s < 0 for s in self.stride) or len(self.size) != len(self.stride):
            raise ValueError(f'tensor with offset {self.offset}, size {self.size}, stride {self.stride} is malformed')
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if last >= len(flat):
            raise ValueError(f'tensor with offset {self.offset}, size {self.size}, stride {self.stride} '
                             f'reaches past its storage of {len(flat)} elements')
        view = np.lib.stride_tricks.as_strided(flat[self.offset:], shape=self.size,
                                               strides=[s * dtype.itemsize for s in self.stride])
        return view.astype(self.dtype, order='C', copy=True)  # native byte order, own C-contiguous memory


class _StorageType:
    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


class _Marker:
    """Stands for a torch class that only appears as an argument (torch.Tensor, Parameter)."""

    def __init__(self, name: str):
        self.name = name


class _NotAStateDict(Exception):
    """The pickle needs a class outside a state dict's vocabulary (a whole model, an optimizer, ...)."""


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, *unused):
    return _Tensor(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(tensor, *unused):
    return tensor


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)


_GLOBALS = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v3'): _rebuild_tensor_v3,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
    ('torch', 'Tensor'): _Marker('torch.Tensor'),
    ('torch.nn.parameter', 'Parameter'): _Marker('torch.nn.parameter.Parameter'),
}


class _Unpickler(pickle.Unpickler):
    """Unpickles a torch.save stream into _Tensor placeholders; refuses every other class."""

    def __init__(self, file, storages: dict, load_storage):
        super().__init__(file)
        self._storages = storages          # key -> _Storage, shared by all pickles of one file
        self._load_storage = load_storage  # fills a new _Storage's bytes (zip), or None (legacy: later)

    def find_class(self, module: str, name: str):
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        if module in ('torch', 'torch.storage', 'torch.cuda') and name in _STORAGE_DTYPES:  # GPU-saved: torch.cuda.*
            return _StorageType(name)
        if module == 'torch' and name in _TORCH_DTYPES:
            return np.dtype(_TORCH_DTYPES[name])
        raise _NotAStateDict(f'{module}.{name}')

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise ValueError(f'unknown persistent id {pid!r}')
        if pid[0] == 'module':  # legacy torch.save of a whole nn.Module records its classes' source
            raise _NotAStateDict(getattr(pid[1], 'name', 'an nn.Module'))
        if pid[0] != 'storage' or len(pid) not in (5, 6) or not isinstance(pid[1], _StorageType):
            raise ValueError(f'unknown persistent id {pid!r}')
        storage_type, key = pid[1], str(pid[2])
        if key not in self._storages:
            storage = _Storage(key, storage_type.dtype)
            if self._load_storage is not None:
                storage.data = self._load_storage(key)
            self._storages[key] = storage
        storage = self._storages[key]
        view = pid[5] if len(pid) == 6 else None
        if view is not None:  # pre-1.0 storage views; new files always write None
            view_key, offset, size = view
            if view_key not in self._storages:
                self._storages[view_key] = _StorageView(storage, int(offset), int(size))
            return self._storages[view_key]
        return storage


def _unpickle(stream, storages, load_storage=None):
    return _Unpickler(stream, storages, load_storage).load()


def _read_legacy(stream: io.BytesIO, name: str):
    """Reads the legacy serialization; returns (object with _Tensor leaves, byte order)."""
    try:
        magic = _unpickle(stream, {})
    except _NotAStateDict as e:
        raise ValueError(f'{name} is a pickle of a {e} object, not {PTH_EXPECTED}.') from None
    except Exception as e:  # anything that is not a pickle fails here, in many ways
        raise ValueError(f'{name} is not {PTH_EXPECTED}: it is neither a zip archive nor a pickle ({e}).') from None
    if magic != _LEGACY_MAGIC:
        raise ValueError(f'{name} is a pickle, but not {PTH_EXPECTED}: it lacks the torch.save magic number.')
    try:
        protocol = _unpickle(stream, {})
        sys_info = _unpickle(stream, {})
    except Exception as e:
        raise ValueError(f'{name}: truncated or corrupt torch.save header ({e}).') from None
    if protocol != _LEGACY_PROTOCOL:
        raise ValueError(f'{name}: torch.save protocol {protocol!r}, expected {_LEGACY_PROTOCOL}.')
    byteorder = '<' if not isinstance(sys_info, dict) or sys_info.get('little_endian', True) else '>'
    storages: dict[str, Any] = {}
    obj = _unpickle(stream, storages)
    keys = _unpickle(stream, {})
    for key in keys:
        storage = storages.get(key)
        if not isinstance(storage, _Storage):
            raise ValueError(f'{name}: the file lists storage {key!r} that no tensor uses; it is corrupt.')
        header = stream.read(8)
        if len(header) != 8:
            raise ValueError(f'{name} is truncated: storage {key!r} is missing.')
        (numel,) = struct.unpack(byteorder + 'q', header)
        nbytes = numel * storage.dtype.itemsize
        storage.data = stream.read(nbytes)
        if len(storage.data) != nbytes:
            raise ValueError(f'{name} is truncated: storage {key!r} has {len(storage.data)} of {nbytes} bytes.')
    return obj, byteorder


def _read_torch_zip(archive: zipfile.ZipFile, prefix: str, name: str):
    """Reads the zip serialization (prefix/data.pkl); returns (object with _Tensor leaves, byte order)."""
    names = set(archive.namelist())
    byteorder = '<'
    if f'{prefix}byteorder' in names:
        byteorder = '>' if archive.read(f'{prefix}byteorder').strip() == b'big' else '<'

    def load_storage(key):
        record = f'{prefix}data/{key}'
        if record not in names:
            raise ValueError(f'{name}: storage record {record!r} is missing; the archive is corrupt.')
        return archive.read(record)

    return _unpickle(io.BytesIO(archive.read(f'{prefix}data.pkl')), {}, load_storage), byteorder


def _read_any(raw: bytes, name: str, wrapped: bool = False):
    if raw[:4] == b'PK\x03\x04':
        try:
            archive = zipfile.ZipFile(io.BytesIO(raw))
        except zipfile.BadZipFile as e:
            raise ValueError(f'{name} starts like a zip archive but is not one ({e}); expected {PTH_EXPECTED}.') from None
        with archive:
            members = [m for m in archive.namelist() if not m.endswith('/')]
            pickles = sorted((m for m in members if re.fullmatch(r'([^/]+/)?data\.pkl', m)), key=len)
            if pickles:
                return _read_torch_zip(archive, pickles[0][:-len('data.pkl')], name)
            if len(members) == 1 and not wrapped:  # the zoo's NAME.pth.zip holds NAME.pth
                return _read_any(archive.read(members[0]), f'{name}:{members[0]}', wrapped=True)
            raise ValueError(f'{name} is a zip archive holding {members[:5]}, not {PTH_EXPECTED}.')
    if len(raw) > 512 and tarfile.is_tarfile(io.BytesIO(raw)):
        raise ValueError(f'{name} is in the tar format of PyTorch before 0.4, which read_pth does not read; '
                         'load it with torch and save it again with torch.save.')
    return _read_legacy(io.BytesIO(raw), name)


def read_pth(path: str) -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict from `path` without PyTorch.

    Accepts the legacy (pre-1.6) and the zip (torch >= 1.6) serializations of torch.save, and a
    zip archive wrapping one such file (the model zoo's `.pth.zip`). Returns {key: array} in
    the file's order; arrays are C-contiguous copies in native byte order with the tensors'
    shapes and dtypes (bfloat16 and float8 as ml_dtypes types).

    Raises FileNotFoundError for a missing file and ValueError for anything that is not a
    state dict (a training checkpoint {'state_dict': ...}, a whole pickled model, another file).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path!r} does not exist or is not a file; expected {PTH_EXPECTED}.')
    with open(path, 'rb') as f:
        raw = f.read()
    name = path
    try:
        obj, byteorder = _read_any(raw, name)
    except _NotAStateDict as e:
        raise ValueError(
            f'{name} holds a pickled {e} object, not a state dict (a dict of tensors). '
            'If it is a whole model, save `model.state_dict()` instead; pytorchcv zoo files are state dicts.') from None
    except ValueError as e:
        raise (e if name in str(e) else ValueError(f'{name}: {e}')) from None
    except Exception as e:
        raise ValueError(f'{name} is corrupt or not {PTH_EXPECTED} ({type(e).__name__}: {e}).') from None
    if not isinstance(obj, dict):
        raise ValueError(f'{name} holds a {type(obj).__name__}, not a state dict (a dict of tensors).')
    if 'state_dict' in obj and isinstance(obj['state_dict'], dict):
        raise ValueError(
            f"{name} is a training checkpoint (keys {sorted(map(str, obj))}), not a state dict: "
            "save its 'state_dict' entry on its own (`torch.save(ckpt['state_dict'], path)`) and convert that.")
    others = [k for k, v in obj.items() if not isinstance(v, _Tensor) or not isinstance(k, str)]
    if others:
        raise ValueError(f'{name} holds a dict with non-tensor entries {others[:5]}, not a state dict '
                         '(a flat dict of tensors, as `model.state_dict()` gives).')
    try:
        return {k: v.materialize(byteorder) for k, v in obj.items()}
    except ValueError as e:
        raise ValueError(f'{name} is corrupt: {e}.') from None


# ------------------------------------------------------------------------------------------
# pytorchcv state dict -> Flax variables
#
# The Flax modules are named after pytorchcv's state-dict keys, so the key of every Flax variable
# follows from its path (`_torch_key`): drop `features.` and ResUnit's `body.`, join with '_'
# inside `stageS_unitJ`, and rename the leaves. Only the architecture fields (depth, widths) have
# to be read from the file (`infer_model`); the variable tree then comes from the module itself.

_UNIT = re.compile(r'stage(\d+)_unit(\d+)')
_UNIT_KEY = re.compile(r'features\.stage(\d+)\.unit(\d+)\.')
_LEAVES = {'params': {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'},
           'batch_stats': {'mean': 'running_mean', 'var': 'running_var'}}
# A kernel's layout by rank: conv OIHW -> HWIO, linear (out, in) -> (in, out).
_TRANSPOSE = {4: (2, 3, 1, 0), 2: (1, 0)}
# The width of the last unit of the full-width zoo models, to name reduced-width files (`pytorchcv_name`).
_FULL_LAST_WIDTH = {(ResNet, False): 512, (ResNet, True): 2048, (MobileNetV2, False): 320}


def _torch_key(model, collection: str, path: tuple[str, ...]) -> str:
    """The pytorchcv state-dict key of the Flax variable `collection`/`path` of `model`."""
    head, *inner, leaf = path
    if head == 'output':
        prefix = ['output']
    elif match := _UNIT.fullmatch(head):
        prefix = ['features', f'stage{match[1]}', f'unit{match[2]}']
        if not isinstance(model, MobileNetV2) and inner[0] != 'identity_conv':
            prefix.append('body')   # pytorchcv's ResUnit keeps its branch in `body`
    else:
        prefix = ['features', head]
    return '.'.join(prefix + inner + [_LEAVES[collection][leaf]])


def _rows(state_dict, key: str) -> int:
    """The output channels (first axis) of `state_dict[key]`; ValueError naming the key if absent."""
    if key not in state_dict or np.ndim(state_dict[key]) < 1:
        raise ValueError(f'the state dict lacks {key!r} (or it is a scalar), so the widths cannot be inferred; '
                         f'its first keys are {list(state_dict)[:5]}.')
    return int(np.shape(state_dict[key])[0])


def _unit_widths(state_dict, last_conv: str) -> tuple[tuple[int, ...], ...]:
    """Per stage, per unit output widths: the rows of each `features.stageS.unitJ.{last_conv}`."""
    units = {(int(m[1]), int(m[2])) for k in state_dict if (m := _UNIT_KEY.match(k))}
    if not units:
        raise ValueError("the state dict has no 'features.stageS.unitJ.*' entries, so no stages can be inferred.")
    stages = max(s for s, _ in units)
    return tuple(tuple(_rows(state_dict, f'features.stage{s}.unit{j}.{last_conv}.conv.weight')
                       for j in range(1, max((u for t, u in units if t == s), default=0) + 1))
                 for s in range(1, stages + 1))


def _classes(state_dict, rank: int, layout: str) -> int:
    weight = state_dict['output.weight']
    if np.ndim(weight) != rank:
        raise ValueError(f"'output.weight' has shape {np.shape(weight)}, expected {layout}.")
    return int(weight.shape[0])


def infer_model(state_dict: dict[str, np.ndarray]):
    """The full-precision Flax module of a pytorchcv state dict, its fields read from the keys and shapes.

    pytorchcv's ResNet (basic or bottleneck units) has `features.init_block.conv.conv.weight`,
    MobileNetV2 `features.final_block.conv.weight`, CIFARResNet neither but
    `features.init_block.conv.weight`. Returns a ResNet, MobileNetV2 or ResNetCifar; raises
    ValueError for anything else.
    """
    if 'output.weight' not in state_dict or not any(k.startswith('features.init_block.') for k in state_dict):
        raise ValueError("the state dict is not one of pytorchcv's CIFARResNet, ResNet or MobileNetV2: it needs "
                         "'features.init_block.*' and 'output.weight' entries; "
                         f'its first keys are {list(state_dict)[:5]}.')
    if 'features.init_block.conv.conv.weight' in state_dict:
        bottleneck = 'features.stage1.unit1.body.conv3.conv.weight' in state_dict
        return ResNet(num_classes=_classes(state_dict, 2, '(num_classes, C)'),
                      channels=_unit_widths(state_dict, 'body.conv3' if bottleneck else 'body.conv2'),
                      init_channels=_rows(state_dict, 'features.init_block.conv.conv.weight'), bottleneck=bottleneck)
    if 'features.final_block.conv.weight' in state_dict:
        return MobileNetV2(num_classes=_classes(state_dict, 4, '(num_classes, C, 1, 1)'),
                           channels=_unit_widths(state_dict, 'conv3'),
                           init_channels=_rows(state_dict, 'features.init_block.conv.weight'),
                           final_channels=_rows(state_dict, 'features.final_block.conv.weight'))
    num_classes = _classes(state_dict, 2, '(num_classes, 64)')
    units = {int(m[2]) for k in state_dict if (m := _UNIT_KEY.match(k)) and m[1] == '1'}
    if not units:
        raise ValueError("the state dict has no 'features.stage1.unitJ.*' entries, so no depth can be inferred.")
    return ResNetCifar(num_classes=num_classes, depth=6 * max(units) + 2)


def pytorchcv_name(model) -> str:
    """pytorchcv's name for `model`'s architecture: 'resnet20' (CIFAR), 'resnet18', 'resnet50_wd8',
    'mobilenetv2_w1', 'mobilenetv2_wd4' (the width from the last unit's, as pytorchcv scales it)."""
    if isinstance(model, ResNetCifar):
        return f'resnet{model.depth}'
    if isinstance(model, ResNet):
        depth = (3 if model.bottleneck else 2) * sum(len(stage) for stage in model.channels) + 2
        name, full = f'resnet{depth}', ''
    else:
        name, full = 'mobilenetv2', '_w1'
    ratio = model.channels[-1][-1] / _FULL_LAST_WIDTH[type(model), getattr(model, 'bottleneck', False)]
    if ratio == 1:
        return name + full
    return name + (f'_wd{round(1 / ratio)}' if (1 / ratio).is_integer() else f'_w{ratio:g}')


def summary(model) -> str:
    """One line on `model`'s architecture: its pytorchcv name, arch, depth or units and widths, classes."""
    if isinstance(model, ResNetCifar):
        fields = f'depth {model.depth}'
    else:
        fields = (f'units {[len(stage) for stage in model.channels]}, '
                  f'widths {model.channels[0][0]}..{model.channels[-1][-1]}')
        if isinstance(model, ResNet):
            fields = ('bottleneck ' if model.bottleneck else 'basic ') + fields
        else:
            fields += f', final {model.final_channels}'
    return f'{pytorchcv_name(model)} ({models.registry.arch_name(model)}: {fields}, {model.num_classes} classes)'


def _image_shape(model) -> tuple[int, int, int]:
    return IMAGE_SHAPE if isinstance(model, ResNetCifar) else data.imagenet_info().image_shape


def variables_from_state_dict(state_dict: dict[str, np.ndarray]) -> tuple[Any, dict]:
    """Builds the Flax teacher from a pytorchcv CIFARResNet, ResNet or MobileNetV2 state dict.

    The architecture and its widths come from the keys and shapes (`infer_model`). Returns
    (model, {'params', 'batch_stats'}) with float32 numpy arrays; conv kernels OIHW -> HWIO
    (MobileNetV2's 1x1 classifier included), dense kernels (out, in) -> (in, out).
    `num_batches_tracked` entries are ignored. Any missing or unexpected key, non-float entry
    or shape mismatch raises one ValueError that lists them all.
    """
    model = infer_model(state_dict)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(_image_shape(model))),
                                               train=False))
    variables, used, problems = {}, set(), []
    for collection in ('params', 'batch_stats'):
        flat = {}
        for path, expected in traverse_util.flatten_dict(shapes[collection]).items():
            key, where = _torch_key(model, collection, path), f'{collection}/{"/".join(path)}'
            if key not in state_dict:
                problems.append(f'missing {key!r} (for {where} {expected.shape})')
                continue
            used.add(key)
            value = np.asarray(state_dict[key])
            if not (np.issubdtype(value.dtype, np.floating) or value.dtype == ml_dtypes.bfloat16):
                problems.append(f'{key!r} has dtype {value.dtype}, expected floating point')
                continue
            transposed = path[-1] == 'kernel' and value.ndim == len(expected.shape) and value.ndim in _TRANSPOSE
            if transposed:
                value = value.transpose(_TRANSPOSE[value.ndim])
            if value.shape != expected.shape:
                problems.append(f'{key!r} has shape {np.shape(state_dict[key])}, but {pytorchcv_name(model)} needs '
                                f'{where} {expected.shape}'
                                + (" (HWIO/in,out of the file's OIHW/out,in)" if path[-1] == 'kernel' else ''))
                continue
            flat[path] = np.ascontiguousarray(value, dtype=np.float32)
        variables[collection] = traverse_util.unflatten_dict(flat)
    unexpected = [k for k in state_dict if k not in used and not k.endswith('num_batches_tracked')]
    problems += [f'unexpected {k!r} {np.shape(state_dict[k])}' for k in unexpected]
    if problems:
        shown = '\n  '.join(problems[:20]) + (f'\n  ... and {len(problems) - 20} more' if len(problems) > 20 else '')
        raise ValueError(f'the state dict does not match the pytorchcv {summary(model)} that its keys and '
                         f'shapes suggest:\n  {shown}')
    return model, variables


def load_pytorchcv(path: str) -> tuple[Any, dict]:
    """read_pth + variables_from_state_dict: (model, variables) of a pytorchcv CIFARResNet, ResNet
    (resnet18/resnet50-like) or MobileNetV2 file.

    `model.apply(variables, images, train=False)` with normalized NHWC images ((B, 32, 32, 3)
    CIFAR, (B, 224, 224, 3) ImageNet) gives pytorchcv's eval-mode logits (B, num_classes).
    """
    return variables_from_state_dict(read_pth(path))


# ------------------------------------------------------------------------------------------
# Teacher checkpoint


def infer_dataset(path: str) -> Optional[str]:
    """'cifar100' or 'cifar10' from a zoo file name ('resnet20_cifar100-2964-a5322afe.pth'), else None."""
    match = re.search(r'_(cifar100|cifar10)(?![0-9])', os.path.basename(path))
    return match.group(1) if match else None


def _cifar_info(dataset: str, num_classes: int) -> data.DatasetInfo:
    if dataset not in _DATASETS:
        raise ValueError(f'dataset={dataset!r} is not one the pytorchcv CIFAR models use; '
                         f'use one of {sorted(_DATASETS)}.')
    info = data.cifar_info(dataset)
    if info.num_classes != num_classes:
        raise ValueError(f'dataset={dataset!r} has {info.num_classes} classes, but the network '
                         f'has {num_classes} outputs.')
    return info


def dataset_info(model, dataset: Optional[str], path: str) -> data.DatasetInfo:
    """The data a converted `model` takes: imagenet2012 for the ImageNet networks; for a CIFAR
    ResNet `dataset`, else the one in the file name `path`. ValueError when it cannot be told or
    does not fit the network's class count."""
    if isinstance(model, ResNetCifar):
        dataset = dataset or infer_dataset(path)
        if dataset is None:
            raise ValueError(f'cannot tell the dataset from the file name {os.path.basename(path)!r} '
                             f'(no _cifar100/_cifar10 in it): pass --dataset, one of {sorted(_DATASETS)}.')
        return _cifar_info(dataset, model.num_classes)
    if dataset not in (None, IMAGENET):
        raise ValueError(f'--dataset {dataset}: {os.path.basename(path)} holds an ImageNet network '
                         f'({summary(model)}); leave --dataset out or pass {IMAGENET}.')
    info = data.imagenet_info(IMAGENET)
    if model.num_classes != info.num_classes:
        raise ValueError(f'{os.path.basename(path)} holds {summary(model)}, but {IMAGENET} has '
                         f'{info.num_classes} classes.')
    return info


def convert(path: str, out: str, dataset: Optional[str] = None) -> dict[str, Any]:
    """Converts the pytorchcv file `path` into a teacher checkpoint in `out`; returns its metadata.

    ImageNet networks (ResNet, MobileNetV2) are described with imagenet2012's data. For a CIFAR
    ResNet `dataset` defaults to the one in the file name (`..._cifar100...`); with neither,
    ValueError.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--pytorchcv {path!r} does not exist or is not a file.')
    if checkpoint.is_teacher_checkpoint(out) or os.path.exists(os.path.join(out, checkpoint.VARIABLES)):
        raise ValueError(f'--out {out!r} already holds a teacher checkpoint; choose a new directory.')
    model, variables = load_pytorchcv(path)
    meta = checkpoint.model_meta(dataset_info(model, dataset, path), model, os.path.basename(path))
    checkpoint.save_teacher(out, variables, meta)
    return meta


def main(argv: Optional[list[str]] = None) -> int:
    """The command line; returns the exit status (errors are one line on stderr, no traceback)."""
    parser = argparse.ArgumentParser(
        prog='python -m bag_jax.convert',
        description='Convert pytorchcv weights (a .pth or the zoo\'s .pth.zip) of a CIFAR ResNet, an ImageNet '
                    'ResNet (resnet18/resnet50) or MobileNetV2 into a bag-jax teacher checkpoint. Needs no PyTorch.')
    parser.add_argument('--pytorchcv', required=True, metavar='FILE',
                        help='state dict file, e.g. resnet20_cifar100-2964-a5322afe.pth(.zip)')
    parser.add_argument('--out', required=True, metavar='DIR', help='new teacher checkpoint directory')
    parser.add_argument('--dataset', choices=sorted(_DATASETS) + [IMAGENET], default=None,
                        help=f'the data the network was trained on (default: from the file name for CIFAR, '
                             f'{IMAGENET} for the ImageNet networks)')
    args = parser.parse_args(argv)
    try:
        meta = convert(args.pytorchcv, args.out, args.dataset)
    except (OSError, ValueError) as e:
        print(f'{parser.prog}: error: {e}', file=sys.stderr)
        return 1
    out = os.path.abspath(args.out)
    print(f'wrote teacher checkpoint {out}: {summary(models.build(meta))} for {meta["data"]["name"]}, '
          f'from {meta["source"]}')
    print(f'  {os.path.join(out, checkpoint.TEACHER_META)}, {os.path.join(out, checkpoint.VARIABLES)}/')
    return 0


if __name__ == '__main__':
    sys.exit(main())

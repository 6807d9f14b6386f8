"""Writes tests/fixtures/: reference outputs of real PyTorch + pytorchcv for tests/test_convert.py.

Run once, by hand, in a throw-away virtual environment OUTSIDE the repository (bag-jax itself
never installs PyTorch):

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.13.0 pytorchcv      # CPU torch; made with pytorchcv 0.0.74
    /tmp/torchenv/bin/python tests/make_pytorchcv_fixture.py   # from the repository root

The networks come from `pytorchcv.models.resnet_cifar`, the functions that
`pytorchcv.model_provider.get_model('resnet20_cifar100')` dispatches to. The script calls them
directly because `model_provider` imports torchvision for unrelated models, and torchvision's
PyPI build does not load against the CPU torch wheel. Weights are random (fixed seeds, no
download). BN running statistics and affine parameters are made non-trivial (train-mode
forwards on random data, then random perturbation), so a conversion that mixes up mean/var
or scale/bias fails the parity test.

What it writes (about 1.4 MB in all; arrays and tiny .pth files only, so the tests need no
PyTorch):
  resnet20_cifar100.npz     pytorchcv resnet20_cifar100 in eval mode: every state-dict entry
                            under its own key ('features.init_block.conv.weight', ...,
                            num_batches_tracked included), 'images' (4, 32, 32, 3) float32 NHWC
                            (the network saw them as NCHW), and for those images 'logits' (4, 100)
                            float32 and 'logits_float64' (4, 100) from the same network in float64.
  resnet8_cifar10.pth.zip   a depth-8 pytorchcv CIFARResNet for 10 classes
                            (`get_resnet_cifar(10, blocks=8, bottleneck=False)`), saved the way
                            the osmr/imgclsmob model zoo ships its 2019 weights: state dict in the
                            legacy (non-zip) torch format, as `resnet8_cifar10.pth`, inside a
                            deflated zip archive.
  resnet8_cifar10.npz       'logits' (4, 10) float32 of that network in eval mode for 'images' of
                            resnet20_cifar100.npz.
  tensors_legacy.pth        one small dict of tensors (see `small_tensors`), legacy format
                            (`_use_new_zipfile_serialization=False`);
  tensors_zip.pth           the same dict, default zip format;
  tensors_zip.pth.zip       tensors_zip.pth wrapped in a zip archive (the zoo's download form);
  tensors.npz               the expected arrays (bfloat16 stored as float32, see 'dtypes');
                            'dtypes' maps each key to its numpy dtype name.
  training_checkpoint.pth   {'state_dict': ..., 'epoch': 3}: a file read_pth must refuse clearly;
  whole_model.pth           torch.save of a whole nn.Linear module: likewise.
"""

import io
import os
import zipfile

import numpy as np
import torch
from pytorchcv.models.resnet_cifar import get_resnet_cifar, resnet20_cifar100

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
NUM_IMAGES = 4


def make_nontrivial(net: torch.nn.Module, generator: torch.Generator) -> None:
    """Gives every BN running statistics from a few train-mode passes, then perturbs BN and stats."""
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 3, 32, 32, generator=generator) * 1.5 + 0.2)
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(1.0 + 0.3 * torch.randn(c, generator=generator))
                module.bias.copy_(0.2 * torch.randn(c, generator=generator))
                module.running_mean.add_(0.1 * torch.randn(c, generator=generator))
                module.running_var.mul_(torch.empty(c).uniform_(0.5, 2.0, generator=generator))
    net.eval()


def state_dict_arrays(net: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()}


def small_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A few tensors covering what read_pth must handle: dtypes, 0-d, empty, strides, offsets, sharing."""
    base = torch.randn(20, generator=generator)
    matrix = torch.randn(3, 5, generator=generator)
    return {
        'conv.weight': torch.randn(4, 3, 3, 3, generator=generator),            # float32, 4-D
        'bn.bias': torch.randn(4, generator=generator),                          # float32 vector
        'bn.num_batches_tracked': torch.tensor(7, dtype=torch.int64),            # 0-d int64
        'index': torch.arange(6, dtype=torch.int64).reshape(2, 3) * (2 ** 40) - 5,  # needs 64 bits
        'transposed': matrix.t(),                                                # stride (1, 5), not contiguous
        'shared.base': base,                                                     # its storage is shared by:
        'shared.offset_view': base[5:11].view(2, 3),                             # storage offset 5
        'shared.strided_view': base[1::4],                                       # offset 1, stride 4
        'float64': torch.randn(2, 2, dtype=torch.float64, generator=generator),
        'float16': torch.randn(3, generator=generator).half(),
        'bfloat16': torch.tensor([1.5, -2.25, 3.0e10]).bfloat16(),
        'int32': torch.tensor([-3, 2 ** 31 - 1], dtype=torch.int32),
        'uint8': torch.tensor([0, 7, 255], dtype=torch.uint8),
        'uint16': torch.tensor([1, 65535], dtype=torch.uint16),                  # pickled with _rebuild_tensor_v3
        'bool': torch.tensor([True, False, True]),
        'empty': torch.zeros(0, 3),
    }


def expected_npz(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    out, dtypes = {}, {}
    for k, v in tensors.items():
        if v.dtype == torch.bfloat16:
            out[k], dtypes[k] = v.float().numpy(), 'bfloat16'
        elif v.dtype == torch.uint16:
            out[k], dtypes[k] = v.to(torch.int32).numpy().astype(np.uint16), 'uint16'
        else:
            out[k] = v.numpy().copy()
            dtypes[k] = out[k].dtype.name
    out['dtypes'] = np.array([f'{k}={d}' for k, d in dtypes.items()])
    return out


def write_zip(path: str, member: str, data: bytes, compression=zipfile.ZIP_DEFLATED) -> None:
    with zipfile.ZipFile(path, 'w', compression=compression) as z:
        z.writestr(member, data)


def main() -> None:
    os.makedirs(FIXTURES, exist_ok=True)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(NUM_IMAGES, 3, 32, 32, generator=generator)

    # (a) resnet20_cifar100 parity.
    net = resnet20_cifar100()
    make_nontrivial(net, generator)
    with torch.no_grad():
        logits = net(images).numpy()
        logits64 = net.double()(images.double()).numpy()
    net.float()
    arrays = state_dict_arrays(net)
    assert not ({'images', 'logits', 'logits_float64'} & set(arrays))
    np.savez_compressed(os.path.join(FIXTURES, 'resnet20_cifar100.npz'),
                        images=images.permute(0, 2, 3, 1).numpy(), logits=logits, logits_float64=logits64,
                        **arrays)
    print('resnet20_cifar100: params', sum(p.numel() for p in net.parameters()),
          'logits range', float(logits.min()), float(logits.max()),
          'float32 vs float64 max diff', float(np.abs(logits - logits64).max()))

    # A zoo-style resnet8_cifar10: legacy .pth inside a .pth.zip.
    net8 = get_resnet_cifar(num_classes=10, blocks=8, bottleneck=False)
    make_nontrivial(net8, generator)
    with torch.no_grad():
        logits8 = net8(images).numpy()
    buffer = io.BytesIO()
    torch.save(net8.state_dict(), buffer, _use_new_zipfile_serialization=False)
    write_zip(os.path.join(FIXTURES, 'resnet8_cifar10.pth.zip'), 'resnet8_cifar10.pth', buffer.getvalue())
    np.savez(os.path.join(FIXTURES, 'resnet8_cifar10.npz'), logits=logits8)
    print('resnet8_cifar10: params', sum(p.numel() for p in net8.parameters()))

    # (b) tiny .pth files in both serializations.
    tensors = small_tensors(generator)
    torch.save(tensors, os.path.join(FIXTURES, 'tensors_legacy.pth'), _use_new_zipfile_serialization=False)
    torch.save(tensors, os.path.join(FIXTURES, 'tensors_zip.pth'))
    with open(os.path.join(FIXTURES, 'tensors_zip.pth'), 'rb') as f:
        write_zip(os.path.join(FIXTURES, 'tensors_zip.pth.zip'), 'tensors_zip.pth', f.read())
    np.savez(os.path.join(FIXTURES, 'tensors.npz'), **expected_npz(tensors))

    small = {k: tensors[k] for k in ('conv.weight', 'bn.bias')}
    torch.save({'state_dict': small, 'epoch': 3}, os.path.join(FIXTURES, 'training_checkpoint.pth'))
    torch.save(torch.nn.Linear(3, 2), os.path.join(FIXTURES, 'whole_model.pth'))

    for name in sorted(os.listdir(FIXTURES)):
        print(f'{os.path.getsize(os.path.join(FIXTURES, name)):>9}  {name}')


if __name__ == '__main__':
    main()

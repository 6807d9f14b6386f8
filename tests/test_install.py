"""`pip install` gives a working `bag-jax`: the wheel that pyproject.toml builds, installed into a
fresh environment, runs without the checkout.

The fresh venv gets this environment's dependencies through a .pth file (installing them again
would take minutes and a network), but not the repository: the commands run outside it, and the
bag_jax they import is the one the wheel put into the venv.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from tests.conftest import CACHE_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the wheel is built from (pyproject.toml names it all), copied so that the build's
# build/ and *.egg-info stay out of the checkout.
SOURCES = ('pyproject.toml', 'README.md', 'bag_jax', 'configs')
# The smallest digits run: a depth-8 teacher for 1 epoch, then 1 epoch of 1 iteration at batch 8.
TINY_RUN = ['--config.teacher.depth=8', '--config.teacher.epochs=1', '--config.batch_size=8', '--config.epochs=1',
            '--config.iters_per_epoch=1', '--config.warmup_epochs=0', '--config.calibration_epochs=1',
            '--config.lr_milestones=()', '--config.generator.latent_dim=16', '--config.eval_batch_size=200',
            '--verbosity=-1']


def _venv_bin(venv, name: str) -> str:
    return str(venv / ('Scripts' if os.name == 'nt' else 'bin') / name)


def _run(args, cwd, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME', 'VIRTUAL_ENV')}
    env.update(CACHE_ENV, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', PYTHONNOUSERSITE='1',
               BAG_JAX_COMPILATION_CACHE=CACHE_ENV['JAX_COMPILATION_CACHE_DIR'])
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(result):
    assert result.returncode == 0, (result.args, result.stdout[-3000:], result.stderr[-3000:])
    return result


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    """A fresh venv with the built wheel installed: (venv, wheel, a directory outside the checkout)."""
    tmp = tmp_path_factory.mktemp('install')
    src = tmp / 'src'
    src.mkdir()
    for name in SOURCES:
        if os.path.isdir(os.path.join(ROOT, name)):
            shutil.copytree(os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns('__pycache__'))
        else:
            shutil.copy2(os.path.join(ROOT, name), src / name)
    dist = tmp / 'dist'
    # No build isolation and no index: this environment's setuptools builds it, offline.
    _ok(_run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index',
              '--wheel-dir', dist, src], cwd=tmp))
    wheel, = dist.glob('bag_jax-*.whl')

    venv = tmp / 'venv'
    _ok(_run([sys.executable, '-m', 'venv', '--without-pip', venv], cwd=tmp))
    purelib = _ok(_run([_venv_bin(venv, 'python'), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                       cwd=tmp)).stdout.strip()
    # This environment's packages (pip among them) after the venv's own, the repository not.
    ours = {sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']}
    ours |= {p for p in sys.path if os.path.basename(p) in ('site-packages', 'dist-packages')}
    assert not any(os.path.realpath(p) == os.path.realpath(ROOT) for p in ours)
    with open(os.path.join(purelib, 'bag_jax_test_dependencies.pth'), 'w') as f:
        f.write(''.join(p + '\n' for p in sorted(ours) if os.path.isdir(p)))
    _ok(_run([_venv_bin(venv, 'python'), '-m', 'pip', 'install', '--no-deps', '--no-index', wheel], cwd=tmp))
    outside = tmp / 'elsewhere'
    outside.mkdir()
    return venv, wheel, outside


def test_wheel_holds_the_package_its_data_and_the_configs(installed):
    _, wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ('bag_jax/__init__.py', 'bag_jax/cli.py', 'bag_jax/command.py', 'bag_jax/models/resnet_cifar.py',
                 'bag_jax/imagenet_classes.txt', 'bag_jax/configs/base.py', 'bag_jax/configs/digits_w3a3.py'):
        assert name in names, name
    assert not any(n.startswith(('tests/', 'bench/', 'run.py', 'configs/')) for n in names)
    entry_points = next(n for n in names if n.endswith('.dist-info/entry_points.txt'))
    assert 'bag-jax = bag_jax.cli:main' in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_bag_jax_command_runs_outside_the_checkout(installed):
    venv, _, outside = installed
    # The venv's bag_jax, not the checkout's, with its data file.
    out = _ok(_run([_venv_bin(venv, 'python'), '-c',
                    'import importlib.resources, bag_jax; print(bag_jax.__file__); '
                    'print((importlib.resources.files("bag_jax") / "imagenet_classes.txt").is_file())'], cwd=outside))
    location, has_data = out.stdout.split()
    assert os.path.realpath(location).startswith(os.path.realpath(venv) + os.sep) and has_data == 'True'

    bag_jax = _venv_bin(venv, 'bag-jax')
    out = _ok(_run([bag_jax, '--help'], cwd=outside)).stdout
    assert all(f'  {name} ' in out for name in ('run', 'export', 'report', 'convert', 'zoo')), out
    out = _run([bag_jax, 'run', '--helpshort'], cwd=outside)
    assert '--workdir' in out.stdout and '--num_processes' in out.stdout and 'bag-jax run --config=' in out.stdout
    assert '--out' in _ok(_run([bag_jax, 'export', '--help'], cwd=outside)).stdout

    # A config file of the checkout (it imports `from configs import base`), from elsewhere: a
    # mistake in it is one line.
    out = _run([bag_jax, 'run', f'--config={ROOT}/configs/cifar100_w3a3.py', '--config.quant.w_bits=0',
                f'--workdir={outside / "refused"}'], cwd=outside)
    assert out.returncode == 1 and out.stderr.startswith(
        'bag-jax run: error: quant.w_bits=0 is not a valid bit-width') and out.stderr.count('\n') == 1, out.stderr

    # The tiny run, with the config the package ships (there is no configs/ here).
    workdir = outside / 'digits'
    _ok(_run([bag_jax, 'run', '--config=configs/digits_w3a3.py', f'--workdir={workdir}', *TINY_RUN], cwd=outside))
    out = _ok(_run([bag_jax, 'report', workdir], cwd=outside)).stdout
    assert out.startswith(f'{workdir}: bag W3A3, teacher ') and 'best_top1' in out, out
    assert (workdir / 'summary.json').is_file() and (workdir / 'student' / 'student.json').is_file()

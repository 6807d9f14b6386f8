"""notebooks/quickstart.ipynb runs top to bottom, so a change that breaks it fails CI."""

import json
import os
import shlex
import sys

import jax
import nbformat
from nbclient import NotebookClient

from tests.conftest import NUM_TEST_DEVICES, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'quickstart.ipynb')
KERNEL = 'bag-jax-test'


def tiny_flags() -> str:
    """Overrides that turn configs/digits_w3a3.py into the tests' tiny run: the same programs as
    the session's tests compile, so the run the notebook starts finds them in the session's
    compilation cache."""
    c = tiny_config('bag')
    fields = ('teacher.depth', 'teacher.epochs', 'teacher.batch_size', 'teacher.lr', 'batch_size', 'epochs',
              'iters_per_epoch', 'warmup_epochs', 'calibration_epochs', 'lr_milestones', 'generator.latent_dim',
              'eval_batch_size', 'image_grid_every')
    flags = []
    for field in fields:
        value = c
        for part in field.split('.'):
            value = value[part]
        flags.append(f'--config.{field}={value}')
    return ' '.join(shlex.quote(f) for f in flags)


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    workdir = tmp_path / 'digits'
    monkeypatch.setenv('BAG_JAX_NOTEBOOK_WORKDIR', str(workdir))
    monkeypatch.setenv('BAG_JAX_NOTEBOOK_FLAGS', tiny_flags())
    # The `bag-jax run` that the notebook starts: this session's devices and compilation cache.
    monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
    monkeypatch.setenv('JAX_NUM_CPU_DEVICES', str(NUM_TEST_DEVICES))
    monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', jax.config.jax_compilation_cache_dir)
    monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS',
                       str(jax.config.jax_persistent_cache_min_compile_time_secs))
    # The kernel is this interpreter, whatever other kernels Jupyter knows, started in the
    # repository root: a checkout with its requirements installed, so the install cell installs
    # nothing, and `python -m bag_jax run` runs the checkout's code.
    kernel_dir = tmp_path / 'jupyter' / 'kernels' / KERNEL
    kernel_dir.mkdir(parents=True)
    (kernel_dir / 'kernel.json').write_text(json.dumps({
        'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
        'display_name': KERNEL, 'language': 'python'}))
    monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell('import sys; print(sys.executable); print(sys.prefix)'))   # the test's
    client = NotebookClient(nb, timeout=300, kernel_name=KERNEL, resources={'metadata': {'path': ROOT}})
    client.execute()

    # This interpreter, in this environment (a venv's python is a link to the base interpreter's).
    executable, prefix = nb.cells[-1].outputs[0]['text'].strip().splitlines()
    assert (os.path.realpath(executable), os.path.realpath(prefix)) == (os.path.realpath(sys.executable),
                                                                       os.path.realpath(sys.prefix))
    with open(workdir / 'summary.json') as f:
        summary = json.load(f)
    assert (summary['method'], summary['w_bits'], summary['a_bits'], summary['epochs']) == ('bag', 3, 3, 2)
    images = [o for cell in nb.cells for o in cell.get('outputs', []) if 'image/png' in o.get('data', {})]
    assert len(images) == 2                                   # the first and the last grid
    tables = [o['data']['text/markdown'] for cell in nb.cells for o in cell.get('outputs', [])
              if 'text/markdown' in o.get('data', {})]
    assert len(tables) == 1 and f"| student, last epoch | {summary['last_top1']:.2f} |" in tables[0]

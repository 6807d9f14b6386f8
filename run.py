"""Command-line entry point: `python run.py --config=configs/cifar100_w3a3.py --workdir=W`.

Everything happens in the library (`bag_jax.experiment.run`); this file only parses flags and
reports errors. `--config.x.y=v` overrides any config field; the config's `mode` picks what runs
('quantize', 'teacher' or 'evaluate'). A multi-process run (several hosts, or one process per
GPU) starts the same command in every process, with the flags below or their environment
variables; without them the run is one process (README.md, "Several processes: TPU pod slices,
several GPUs, several hosts").

A mistake of the user's (a bad config value, a missing checkpoint or dataset, a workdir in use)
is printed as one line, `run.py: error: ...`, exit status 1; `--verbosity=1` or the environment
variable BAG_JAX_TRACEBACK=1 shows the traceback as well.
"""

import importlib.util
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file in configs/.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the summary.')
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-process runs: HOST:PORT where process 0 listens (default: '
    '$JAX_COORDINATOR_ADDRESS).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-process runs: the number of processes '
                                      '(default: $JAX_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-process runs: this process, 0 to num_processes-1 '
                                   '(default: $JAX_PROCESS_ID).')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'Join a multi-process run that JAX detects: a Cloud TPU '
                                 'VM pod slice, SLURM srun, Open MPI mpirun.')

TRACEBACK_ENV = 'BAG_JAX_TRACEBACK'
_ROOT = os.path.dirname(os.path.abspath(__file__))
_OWN_CODE = (os.path.join(_ROOT, 'bag_jax') + os.sep, os.path.join(_ROOT, 'configs') + os.sep)


def _wants_traceback() -> bool:
    verbosity = flags.FLAGS['verbosity'].value if flags.FLAGS.is_parsed() else 0
    return verbosity >= 1 or os.environ.get(TRACEBACK_ENV, '') not in ('', '0')


def _fail(message: str) -> None:
    print(f'run.py: error: {message}', file=sys.stderr)
    sys.exit(1)


def is_user_error(error: BaseException) -> bool:
    """True for the errors bag-jax raises about its input (a config value, a file, the data, the
    workdir): ValueError, OSError and bag-jax's own RuntimeErrors, raised in bag_jax/ or configs/.
    Anything else is a bug, whose traceback is what a report needs."""
    from bag_jax import checkpoint, data, workdir
    own_types = (ValueError, FileNotFoundError, FloatingPointError, checkpoint.CheckpointError,
                 data.DatasetUnavailableError, workdir.WorkdirError)
    if not isinstance(error, own_types):
        return False
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(_OWN_CODE)


def config_flag_error(argv: list[str], error: Exception) -> str | None:
    """The one-line message for a failed flag (`--config=FILE`, `--config.FIELD=...`, any other),
    or None when the failure is not about the flags."""
    from bag_jax import validation
    config = _config_without_overrides(argv)
    if config is not None:
        for arg in argv[1:]:
            if arg.startswith('--config.'):
                message = validation.unknown_field_message(config, arg[len('--config.'):].split('=', 1)[0])
                if message:
                    return message
    text = str(error)
    if 'Error whilst parsing config file' in text:
        # ml_collections quotes the config file's traceback: its last line is the error.
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return f'{text.split(":", 1)[0]}: {lines[-1]}'
    if isinstance(error, flags.Error):   # a bad flag value, an unknown flag
        return f'{text.splitlines()[0] if text else type(error).__name__} (python run.py --helpshort lists the flags)'
    return None


def _config_without_overrides(argv: list[str]):
    """The config that `--config=FILE[:ARG]` names, loaded without the `--config.FIELD`
    overrides (ml_collections keeps no config when one of them fails), or None if it cannot be
    loaded either."""
    spec = next((arg.split('=', 1)[1] for arg in argv[1:] if arg.startswith('--config=')), None)
    if spec is None:
        return None
    path, _, arg = spec.partition(':')
    try:
        module_spec = importlib.util.spec_from_file_location('bag_jax_config_file', path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except Exception:   # the file itself is broken: that is reported from the original error
        return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with config mistakes reported as one line (see config_flag_error)."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError) as e:
        message = config_flag_error(argv, e)
        if message is None:
            raise
        _fail(message)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    # TensorFlow (tf.data for tfds) is imported only where CIFAR is read, with its GPUs hidden
    # there so that it leaves accelerator memory to JAX (bag_jax.data).
    from bag_jax import experiment
    try:
        experiment.run(_CONFIG.value, _WORKDIR.value, coordinator_address=_COORDINATOR_ADDRESS.value,
                       num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value, detect=_DISTRIBUTED.value)
    except Exception as e:
        if _wants_traceback() or not is_user_error(e):
            raise
        _fail(str(e))


if __name__ == '__main__':
    flags.mark_flags_as_required(['config', 'workdir'])
    app.run(main, flags_parser=parse_flags)

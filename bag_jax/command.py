"""The command that runs an experiment: `python run.py` and `bag-jax run` (bag_jax/cli.py) are
both `main_entry` here, with the same flags.

Everything happens in the library (`bag_jax.experiment.run`); this module only parses flags and
reports errors. `--config.x.y=v` overrides any config field; the config's `mode` picks what runs
('quantize', 'teacher' or 'evaluate'). A multi-process run (several hosts, or one process per
GPU) starts the same command in every process, with the flags below or their environment
variables; without them the run is one process (docs/multi-host.md).

A mistake of the user's (a bad config value, a missing checkpoint or dataset, a workdir in use)
is printed as one line, `run.py: error: ...` (`bag-jax run: error: ...`), exit status 1;
`--verbosity=1` or the environment variable BAG_JAX_TRACEBACK=1 shows the traceback as well.

Config files import each other as `from configs import base`. The file that --config names gets
the configs beside it: when it lies in a `configs/` package (the repository's, or a copy), the
folder above that package goes first on sys.path; otherwise, when no `configs` is importable, the
configs shipped in the installed package (bag_jax.configs) are `configs`. A `--config` file that
does not exist, given as `NAME.py` or `configs/NAME.py`, is the shipped config NAME.py where there
is one, so that `bag-jax run --config=configs/digits_w3a3.py` works outside a checkout too.
"""

import importlib
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
_FLAG_NAMES = ('config', 'workdir', 'coordinator_address', 'num_processes', 'process_id', 'distributed')

TRACEBACK_ENV = 'BAG_JAX_TRACEBACK'
# Where an error is the user's (is_user_error): raised in the package, or in the config files.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_config_dirs: list[str] = []
# The program's name in error messages, and the command that shows its flags (main_entry sets both).
_prog = 'run.py'
_command = 'python run.py'

# `bag-jax run --help`: the console script has no docstring of its own (absl prints __main__'s).
USAGE = """Quantizes a trained classifier without data, or trains a teacher, or evaluates one.

    {command} --config=CONFIG_FILE[:METHOD] --workdir=WORKDIR [--config.FIELD=VALUE ...]

CONFIG_FILE is a config file, e.g. configs/digits_w3a3.py of a checkout or of the shipped configs
(a path that does not exist names the shipped config of that file name); METHOD picks gdfq, adadfq
or bag with their reference defaults; `--config.FIELD=VALUE` overrides any config field. The
config's `mode` picks what runs ('quantize', 'teacher' or 'evaluate'). A multi-process run starts
the same command in every process, with the multi-process flags below or their environment
variables.

A mistake of the user's (a bad config value, a missing checkpoint or dataset, a workdir in use) is
printed as one line, `{prog}: error: ...`, exit status 1; `--verbosity=1` or the environment
variable BAG_JAX_TRACEBACK=1 shows the traceback as well.
"""


def _wants_traceback() -> bool:
    verbosity = flags.FLAGS['verbosity'].value if flags.FLAGS.is_parsed() else 0
    return verbosity >= 1 or os.environ.get(TRACEBACK_ENV, '') not in ('', '0')


def _fail(message: str) -> None:
    print(f'{_prog}: error: {message}', file=sys.stderr)
    sys.exit(1)


def _own_code() -> tuple[str, ...]:
    configs = sys.modules.get('configs')
    configs_dirs = list(getattr(configs, '__path__', None) or [])
    return tuple(os.path.join(os.path.abspath(d), '') for d in (_PACKAGE_DIR, *_config_dirs, *configs_dirs))


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
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(_own_code())


def config_flag_error(argv: list[str], error: Exception) -> str | None:
    """The one-line message for a failed flag (`--config=FILE`, `--config.FIELD=...`, any other),
    or None when the failure is not about the flags."""
    from bag_jax import settings
    config = _config_without_overrides(argv)
    if config is not None:
        for arg in argv[1:]:
            if arg.startswith('--config.'):
                message = settings.unknown_field_message(config, arg[len('--config.'):].split('=', 1)[0])
                if message:
                    return message
    text = str(error)
    if 'Error whilst parsing config file' in text:
        # ml_collections quotes the config file's traceback: its last line is the error.
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return f'{text.split(":", 1)[0]}: {lines[-1]}'
    if isinstance(error, flags.Error):   # a bad flag value, an unknown flag
        return f'{text.splitlines()[0] if text else type(error).__name__} ({_command} --helpshort lists the flags)'
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


def shipped_configs() -> str | None:
    """The directory of the configs installed with the package (bag_jax.configs, the repository's
    configs/ in a wheel), or None in a checkout, which has them in configs/ instead."""
    try:
        spec = importlib.util.find_spec('bag_jax.configs')
    except ImportError:
        return None
    return None if spec is None or not spec.submodule_search_locations else list(spec.submodule_search_locations)[0]


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _prepare_config(argv: list[str]) -> list[str]:
    """Makes `from configs import ...` in the config file that --config names find its configs
    (the module docstring says which), and replaces a --config file that does not exist by the
    shipped one of that name. Returns argv, with --config's value replaced if it was."""
    argv = list(argv)
    positions = [i for i, arg in enumerate(argv) if i > 0 and (arg.startswith('--config=') or
                                                               (arg == '--config' and i + 1 < len(argv)))]
    if not positions:
        return argv
    i = positions[-1]                                # absl: the last one counts
    value_at, prefix = (i, '--config=') if argv[i].startswith('--config=') else (i + 1, '')
    spec = argv[value_at][len(prefix):]
    path, colon, arg = spec.partition(':')
    shipped = shipped_configs()
    if (shipped and path and not os.path.exists(path) and os.path.normpath(os.path.dirname(path)) in ('.', 'configs')
            and os.path.isfile(os.path.join(shipped, os.path.basename(path)))):
        path = os.path.join(shipped, os.path.basename(path))
        argv[value_at] = prefix + path + colon + arg
    if not os.path.isfile(path):   # ml_collections would report it later, as a traceback
        where = f' (the configs installed with bag-jax: {shipped})' if shipped else ''
        _fail(f'flag --config={spec}: no config file {path!r}{where}')
    directory = os.path.dirname(os.path.abspath(path))
    _config_dirs.append(directory)
    if 'configs' in sys.modules:
        return argv
    if shipped and _same_dir(directory, shipped):
        sys.modules['configs'] = importlib.import_module('bag_jax.configs')
    elif os.path.basename(directory) == 'configs' and os.path.isfile(os.path.join(directory, '__init__.py')):
        root = os.path.dirname(directory)
        if not sys.path or not _same_dir(sys.path[0] or os.curdir, root):
            sys.path.insert(0, root)
    elif shipped and importlib.util.find_spec('configs') is None:
        sys.modules['configs'] = importlib.import_module('bag_jax.configs')
    return argv


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with config mistakes reported as one line (see config_flag_error)."""
    argv = _prepare_config(argv)
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
    from bag_jax import console, experiment
    console.configure_logging(flags.FLAGS['verbosity'].value)
    console.enable_compilation_cache(console.default_cache_directory())
    try:
        experiment.run(_CONFIG.value, _WORKDIR.value, coordinator_address=_COORDINATOR_ADDRESS.value,
                       num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value, detect=_DISTRIBUTED.value)
    except Exception as e:
        failure = console.write_failure(e, where=f'a file in {_WORKDIR.value}')
        if failure is not None and not _wants_traceback():
            # At once: orbax's writer threads would each print the failure again at shutdown.
            console.final_error(f'{_prog}: error: {failure}')
            console.exit_now(1)
        if _wants_traceback() or not is_user_error(e):
            raise
        _fail(str(e))


def main_entry(argv: list[str] | None = None, prog: str = 'run.py', command: str = 'python run.py',
               usage: bool = False) -> None:
    """Parses argv (default sys.argv) and runs; exits the process (absl's app.run). `prog` starts
    the one-line errors, `command` is the command the messages name; `usage` makes --help print
    USAGE (for an entry point without a docstring of its own, such as the console script)."""
    global _prog, _command
    _prog, _command = prog, command
    # --helpshort lists the key flags of the main module, which absl names by sys.argv[0].
    for name in _FLAG_NAMES:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
    if usage:
        sys.modules['__main__'].__doc__ = USAGE.format(command=command, prog=prog)
    flags.mark_flags_as_required(['config', 'workdir'])
    app.run(main, argv=sys.argv if argv is None else argv, flags_parser=parse_flags)

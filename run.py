"""Command-line entry point: `python run.py --config=configs/cifar100_w3a3.py --workdir=W`.

Everything happens in the library (`bag_jax.experiment.run`); this file only parses flags.
`--config.x.y=v` overrides any config field; the config's `mode` picks what runs
('quantize', 'teacher' or 'evaluate'). A multi-process run (several hosts, or one process per
GPU) starts the same command in every process, with the flags below or their environment
variables; without them the run is one process (README.md, "Multi-process runs").
"""

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


def _hide_gpus_from_tensorflow() -> None:
    # tf.data and tfds must not grab accelerator memory that JAX needs.
    try:
        import tensorflow as tf
    except ImportError:
        return
    tf.config.set_visible_devices([], 'GPU')


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    _hide_gpus_from_tensorflow()
    from bag_jax import experiment
    experiment.run(_CONFIG.value, _WORKDIR.value, coordinator_address=_COORDINATOR_ADDRESS.value,
                   num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value, detect=_DISTRIBUTED.value)


if __name__ == '__main__':
    flags.mark_flags_as_required(['config', 'workdir'])
    app.run(main)

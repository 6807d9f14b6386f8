"""Command-line entry point: `python run.py --config=configs/cifar100_w3a3.py --workdir=W`.

Everything happens in the library (`bag_jax.experiment.run`); this file only parses flags.
`--config.x.y=v` overrides any config field; the config's `mode` picks what runs
('quantize', 'teacher' or 'evaluate').
"""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file in configs/.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the summary.')


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
    experiment.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
    flags.mark_flags_as_required(['config', 'workdir'])
    app.run(main)

"""What `run.py` runs: validates the config, joins a multi-process run if there is one, and
dispatches on `config.mode`."""

from __future__ import annotations

import jax
from absl import logging

from bag_jax import parallel, validation


def run(config, workdir: str):
    """Runs `config.mode` ('quantize', 'teacher' or 'evaluate') in `workdir`; returns its result."""
    validation.validate_config(config)
    parallel.initialize_distributed()
    logging.info('mode %s on %d %s device(s), workdir %s', config.mode, jax.device_count(),
                 jax.devices()[0].platform, workdir)
    if config.mode == 'teacher':
        from bag_jax import teacher
        return teacher.train_teacher(config, workdir)
    if config.mode == 'evaluate':
        from bag_jax import evaluate
        return evaluate.run_evaluation(config, workdir)
    from bag_jax import dfq
    return dfq.train_and_evaluate(config, workdir)

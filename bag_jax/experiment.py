"""What `run.py` runs: reads and checks the config once (bag_jax.settings), joins a
multi-process run if there is one, claims the workdir (one run at a time, of one config:
`bag_jax.workdir`), and dispatches on the mode."""

from __future__ import annotations

import jax
from absl import logging

from bag_jax import parallel, settings
from bag_jax import workdir as workdirs


def run(config, workdir: str, **distributed):
    """Runs `config.mode` ('quantize', 'teacher' or 'evaluate') in `workdir`; returns its result.

    `distributed` (coordinator_address, num_processes, process_id, detect) goes to
    `parallel.initialize_distributed`: with none of them set, in the environment either, the run
    is a single process. In a multi-process run every process calls this with the same config and
    workdir, which must be one directory that all of them see at the same path (a shared file
    system): they checkpoint into it together, and only process 0 writes metrics, images and the
    summary.

    Raises workdir.WorkdirError, before anything is loaded, when another run is using `workdir`
    or the run in it was made with another config (`bag_jax.workdir`).
    """
    experiment = settings.parse(config)
    parallel.initialize_distributed(**distributed)
    settings.check_device_split(experiment, jax.device_count())
    logging.info('mode %s on %d %s device(s), workdir %s', experiment.mode, jax.device_count(),
                 jax.devices()[0].platform, workdir)
    with workdirs.claim(experiment.record, workdir):
        if experiment.mode == 'teacher':
            from bag_jax import teacher
            return teacher.train_teacher(experiment, workdir)
        if experiment.mode == 'evaluate':
            from bag_jax import evaluate
            return evaluate.run_evaluation(experiment, workdir)
        from bag_jax import dfq
        return dfq.train_and_evaluate(experiment, workdir)

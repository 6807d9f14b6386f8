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

The command itself is bag_jax/command.py, which the installed `bag-jax run` (bag_jax/cli.py) runs
too; its main, parse_flags, is_user_error, config_flag_error and TRACEBACK_ENV are importable from
here as before.
"""

from bag_jax.command import (TRACEBACK_ENV, config_flag_error, is_user_error, main, main_entry,  # noqa: F401
                             parse_flags)

if __name__ == '__main__':
    main_entry()

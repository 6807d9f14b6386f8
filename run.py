"""Command-line entry point: `python run.py --config=configs/cifar100_w3a3.py --workdir=W`.

The command itself is bag_jax/command.py (its docstring says what it does), which the installed
`bag-jax run` (bag_jax/cli.py) runs too; its main, parse_flags, is_user_error, config_flag_error
and TRACEBACK_ENV are importable from here as before.
"""

from bag_jax.command import (TRACEBACK_ENV, config_flag_error, is_user_error, main, main_entry,  # noqa: F401
                             parse_flags)

if __name__ == '__main__':
    main_entry()

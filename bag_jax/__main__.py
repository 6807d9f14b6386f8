"""`python -m bag_jax COMMAND ...`: the `bag-jax` command (bag_jax/cli.py) without its script."""

import sys

from bag_jax.cli import main

if __name__ == '__main__':
    sys.exit(main(prog='python -m bag_jax'))

"""Test setup: four emulated CPU devices, so sharded code runs for real on one machine."""

import os
import sys

import jax

NUM_TEST_DEVICES = 4
jax.config.update('jax_num_cpu_devices', NUM_TEST_DEVICES)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

# configs/ imports `from configs import base`, as when run.py runs from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

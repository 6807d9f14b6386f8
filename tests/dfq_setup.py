"""A tiny quantization run's config and its step's setup, for the tests of the DFQ loop
(tests/test_dfq.py, tests/test_sweep.py). Not a test module: test modules import no other."""

from bag_jax import checkpoint, data, settings, step
from tests.conftest import tiny_config


def config_with(digits_teacher, method_name='bag', **overrides):
    c = tiny_config(method_name)
    c.teacher.checkpoint = digits_teacher
    for key, value in overrides.items():
        node = c
        *path, last = key.split('.')
        for part in path:
            node = node[part]
        node[last] = value
    return c


def make_setup(config):
    model, variables, meta = checkpoint.load_teacher(config.teacher.checkpoint)
    info = data.DatasetInfo.from_dict(meta['data'])
    return step.build_setup(settings.parse(config).dfq, model, info), variables

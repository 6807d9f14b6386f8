"""The benchmark harness runs the real step and reports what the issue asks for (no timing
assertions: speed is measured by the harness itself, not by tests)."""

import json

import pytest

from bag_jax import bench, settings
from tests.conftest import tiny_config


def test_bench_reports_every_field():
    """A 2-run sweep, as training takes it: per-run and total throughput, XLA's FLOPs."""
    c = tiny_config('bag')
    c.sweep = {'loss.channel_attention': (0.0, 5.0)}
    before = c.to_dict()
    result = bench.run_bench(settings.parse(c), steps=2, repeats=1)
    assert c.to_dict() == before, 'run_bench changed its caller\'s config'
    assert result['steps'] == 2
    assert result['compiled_while_timed'] == 0, 'a timed call compiled a program: the times include XLA'
    for key in ('step_s_median', 'step_s_min', 'compile_s', 'images_per_s', 'peak_rss_mb', 'device_kind',
                'device_count', 'device_peak_bytes', 'epoch_loop'):
        assert key in result
    assert result['device_count'] == 4 and result['batch_size'] == 8
    assert (result['num_runs'], result['mesh_runs'], result['mesh_data']) == (2, 2, 2)
    assert result['sweep'] == {'loss.channel_attention': [0.0, 5.0]}
    assert result['step_s_per_run'] == pytest.approx(result['step_s_median'] / 2)
    assert result['images_per_s'] == pytest.approx(c.batch_size * 2 / result['step_s_median'])
    assert result['images_per_s'] == pytest.approx(2 * result['images_per_s_per_run'])
    assert result['flops_per_iteration'] > 0
    assert result['flops_per_s'] == pytest.approx(result['flops_per_iteration'] / result['step_s_median'])
    json.dumps(result)

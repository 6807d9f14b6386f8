"""The benchmark harness runs the real step and reports what the issue asks for (no timing
assertions: speed is measured by the harness itself, not by tests)."""

import json

from bag_jax import bench
from tests.conftest import tiny_config


def test_bench_reports_every_field():
    c = tiny_config('bag')
    result = bench.run_bench(c, steps=2, repeats=1)
    for key in ('step_s_median', 'step_s_min', 'compile_s', 'images_per_s', 'peak_rss_mb', 'device_kind',
                'device_count', 'device_peak_bytes', 'epoch_loop'):
        assert key in result
    assert result['step_s_min'] <= result['step_s_median'] and result['images_per_s'] > 0
    assert result['device_count'] == 4 and result['batch_size'] == 8
    json.dumps(result)

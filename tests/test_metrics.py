"""Windowed histograms, percentiles and stat() argument checks."""

from __future__ import annotations

import pytest

from serve_core.errors import ServeTypeError, ValidationError
from serve_core.metrics import BUCKET_CAPACITY, WindowedHistogram, check_stat_args, percentile_keys


def test_percentiles_over_a_window() -> None:
    hist = WindowedHistogram(3600)
    for value in range(101):
        hist.record(float(value), now=1000.0)
    keys = percentile_keys("b_latency_s", hist, [50, 90, 95], [60], now=1000.5)
    assert keys == {
        "b_latency_s_50th_perc_60_window": 50.0,
        "b_latency_s_90th_perc_60_window": 90.0,
        "b_latency_s_95th_perc_60_window": 95.0,
    }


def test_windows_select_recent_samples_and_empty_windows_are_omitted() -> None:
    hist = WindowedHistogram(3600)
    hist.record(1.0, now=1000.0)
    hist.record(9.0, now=1100.0)
    keys = percentile_keys("x", hist, [50], [10, 600], now=1100.5)
    assert keys == {"x_50th_perc_10_window": 9.0, "x_50th_perc_600_window": 5.0}
    assert percentile_keys("x", hist, [50], [10], now=5000.0) == {}


def test_old_samples_are_dropped() -> None:
    hist = WindowedHistogram(gc_window_seconds=10)
    hist.record(1.0, now=0.0)
    hist.record(2.0, now=100.0)
    assert list(hist.window(10, now=100.0)) == [2.0]
    assert len(hist._buckets) == 1


def test_memory_per_second_is_bounded() -> None:
    hist = WindowedHistogram(3600)
    for i in range(BUCKET_CAPACITY * 4):
        hist.record(float(i), now=7.0)
    samples = hist.window(10, now=7.0)
    assert len(samples) == BUCKET_CAPACITY
    assert samples.max() > BUCKET_CAPACITY  # later samples replace earlier ones


def test_labels_for_fractional_percentiles() -> None:
    hist = WindowedHistogram(100)
    hist.record(1.0, now=0.0)
    assert list(percentile_keys("x", hist, [99.9], [10], now=0.0)) == ["x_99.9th_perc_10_window"]


def test_stat_argument_checks() -> None:
    assert check_stat_args((50,), (10,), 3600) == ([50], [10])
    with pytest.raises(ValidationError, match="gc_window_seconds"):
        check_stat_args([50], [7200], 3600)
    with pytest.raises(ValidationError):
        check_stat_args([150], [10], 3600)
    with pytest.raises(ServeTypeError):
        check_stat_args(["p50"], [10], 3600)

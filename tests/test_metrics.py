"""Windowed histograms, their snapshots, percentiles and stat() argument checks."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from serve_core.errors import ServeTypeError, ValidationError
from serve_core.metrics import BUCKET_CAPACITY, WindowedHistogram, check_stat_args, percentile_keys


def test_percentiles_over_a_window() -> None:
    hist = WindowedHistogram(3600)
    for value in range(101):
        hist.record(float(value), now=1000.0)
    keys = percentile_keys("b_latency_s", hist.snapshot(now=1000.5), [50, 90, 95], [60])
    assert keys == {
        "b_latency_s_50th_perc_60_window": 50.0,
        "b_latency_s_90th_perc_60_window": 90.0,
        "b_latency_s_95th_perc_60_window": 95.0,
    }


def test_windows_select_recent_samples_and_empty_windows_are_omitted() -> None:
    hist = WindowedHistogram(3600)
    hist.record(1.0, now=1000.0)
    hist.record(9.0, now=1100.0)
    keys = percentile_keys("x", hist.snapshot(now=1100.5), [50], [10, 600])
    assert keys == {"x_50th_perc_10_window": 9.0, "x_50th_perc_600_window": 5.0}
    assert percentile_keys("x", hist.snapshot(now=5000.0), [50], [10]) == {}


def test_windows_end_at_the_given_now() -> None:
    hist = WindowedHistogram(3600)
    hist.record(1.0, now=1000.0)
    hist.record(9.0, now=1100.0)
    snap = hist.snapshot(now=1100.5)
    assert percentile_keys("x", snap, [50], [200], now=1109.5) == {"x_50th_perc_200_window": 5.0}
    assert percentile_keys("x", snap, [50], [10, 200], now=1111.0) == {"x_50th_perc_200_window": 5.0}
    assert list(snap.window(10, now=1109.5)) == [9.0]


def test_old_samples_are_dropped() -> None:
    hist = WindowedHistogram(gc_window_seconds=10)
    hist.record(1.0, now=0.0)
    hist.record(2.0, now=100.0)
    assert list(hist.window(10, now=100.0)) == [2.0]
    assert hist._sealed.samples == []  # the expired bucket is no longer referenced


def test_memory_per_second_is_bounded() -> None:
    hist = WindowedHistogram(3600)
    for i in range(BUCKET_CAPACITY * 4):
        hist.record(float(i), now=7.0)
    samples = hist.window(10, now=7.0)
    assert len(samples) == BUCKET_CAPACITY
    assert samples.max() > BUCKET_CAPACITY  # later samples replace earlier ones


def test_late_samples_go_to_the_open_bucket() -> None:
    hist = WindowedHistogram(3600)
    hist.record(1.0, now=5.0)
    hist.record(2.0, now=6.1)
    hist.record(3.0, now=5.9)  # read the clock before the 6.1 sample was recorded
    hist.record(4.0, now=7.0)
    assert hist._sealed.seconds == [5, 6]
    assert list(hist.window(10, now=7.0)) == [1.0, 2.0, 3.0, 4.0]


def test_a_snapshot_ignores_later_records_and_expiry() -> None:
    hist = WindowedHistogram(gc_window_seconds=10)
    hist.record(1.0, now=0.0)
    hist.record(2.0, now=1.0)
    snap = hist.snapshot(now=1.5)
    hist.record(3.0, now=1.7)  # same open bucket as 2.0, after the snapshot
    hist.record(4.0, now=2.0)  # seals that bucket
    hist.record(5.0, now=50.0)  # expires every bucket and compacts the list
    assert list(snap.window(10)) == [1.0, 2.0]
    assert percentile_keys("x", snap, [50], [10]) == {"x_50th_perc_10_window": 1.5}
    assert list(hist.window(10, now=50.0)) == [5.0]
    assert hist._sealed is not snap.sealed


def test_a_snapshot_shares_the_sealed_buckets() -> None:
    hist = WindowedHistogram(3600)
    for second in range(3601):
        for value in range(3):
            hist.record(float(value), now=second + value / 4)
    snap = hist.snapshot(now=3600.9)
    assert snap.sealed is hist._sealed  # a reference, not a copy
    assert snap.end - snap.start == 3600  # every sealed bucket of the window
    assert list(snap.open) == list(hist._open)
    assert snap.open is not hist._open  # the open bucket still changes: it is copied
    later = hist.snapshot(now=3601.5)
    assert later.sealed.samples[later.start] is snap.sealed.samples[snap.start + 1]
    assert snap.window(3600).size == 3601 * 3


def test_the_sealed_list_stays_within_twice_the_window() -> None:
    gc = 100
    hist = WindowedHistogram(gc)
    rng = random.Random(1)
    lengths = []
    held = []
    for second in range(5000):
        hist.record(float(second), now=second + rng.random())
        lengths.append(len(hist._sealed.seconds))
        if second % 997 == 0:
            held.append((second, hist.snapshot(now=second + 0.99)))
    assert max(lengths) <= 2 * (gc + 1)
    assert list(hist.window(gc, now=4999.99)) == [float(s) for s in range(4899, 5000)]
    for second, snap in held:  # snapshots taken before compactions still read their buckets
        assert list(snap.window(10)) == [float(s) for s in range(max(0, second - 10), second + 1)]


def test_percentiles_over_nested_windows_match_numpy() -> None:
    rng = np.random.default_rng(7)
    hist = WindowedHistogram(3600)
    times = np.sort(rng.uniform(0, 900, size=20_000))
    times[:500] = 3.0  # a busy second
    times[500:] = np.sort(times[500:])
    values = rng.lognormal(size=times.size)
    for value, when in zip(values, times):
        hist.record(float(value), now=float(when))
    now = 905.25
    windows = [0, 1, 2.5, 10, 60, 300, 600, 3600]
    percentiles = [0, 50, 90, 95, 99.9, 100]
    keys = percentile_keys("h", hist.snapshot(now=now), percentiles, windows)
    expected = {}
    for window in windows:
        chosen = values[np.floor(times) >= math.floor(now - window)]
        if chosen.size:
            for pct, value in zip(percentiles, np.percentile(chosen, percentiles)):
                expected[f"h_{pct}th_perc_{window}_window"] = float(value)
    assert keys == pytest.approx(expected, rel=1e-12)
    assert list(keys) == list(expected)  # windows, then percentiles, in the order asked


def test_labels_for_fractional_percentiles() -> None:
    hist = WindowedHistogram(100)
    hist.record(1.0, now=0.0)
    assert list(percentile_keys("x", hist.snapshot(now=0.0), [99.9], [10])) == ["x_99.9th_perc_10_window"]


def test_stat_argument_checks() -> None:
    assert check_stat_args((50,), (10,), 3600) == ([50], [10])
    with pytest.raises(ValidationError, match="gc_window_seconds"):
        check_stat_args([50], [7200], 3600)
    with pytest.raises(ValidationError):
        check_stat_args([150], [10], 3600)
    with pytest.raises(ServeTypeError):
        check_stat_args(["p50"], [10], 3600)  # type: ignore[list-item]


def test_record_many_is_record_of_each_value() -> None:
    """A batch's samples in one step: the same window as recording them one by one, past capacity too."""
    one, many = WindowedHistogram(60), WindowedHistogram(60)
    batches = [[float(i * 10 + j) for j in range(size)] for i, size in enumerate([3, 1, 32, 200, 400])]
    for now, batch in zip([0.1, 0.5, 1.2, 1.7, 1.9], batches):  # two seconds; the second overflows its bucket
        for value in batch:
            one.record(value, now)
        many.record_many(batch, now)
    a, b = one.window(60, 2.0), many.window(60, 2.0)
    assert len(a) == len(b) == 4 + BUCKET_CAPACITY  # the first second's 4, then a full bucket
    assert list(a[:4]) == list(b[:4]) == [0.0, 1.0, 2.0, 10.0]
    assert set(b[4:]) <= {v for batch in batches[2:] for v in batch}

"""Metrics: counters and windowed latency histograms, aggregated by ``stat()``.

Recording is O(1): a sample goes into the one-second bucket of its completion time;
each bucket keeps at most ``BUCKET_CAPACITY`` samples (reservoir sampling beyond
that), and buckets older than ``gc_window_seconds`` are dropped, so memory is bounded
whatever the load. Percentiles are computed with numpy only when ``stat()`` asks.
The owner serialises access (the router records under its lock).
"""

from __future__ import annotations

import collections
import math
import random
from array import array
from collections.abc import Iterable, Sequence

import numpy as np

from .errors import ServeTypeError, ValidationError

BUCKET_CAPACITY = 512
"""Samples kept per one-second bucket; more are reservoir-sampled."""


class Counter:
    """A monotonically increasing count."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class _Bucket:
    __slots__ = ("second", "samples", "seen")

    def __init__(self, second: int) -> None:
        self.second = second
        self.samples = array("d")
        self.seen = 0


class WindowedHistogram:
    """Samples kept by time, for percentiles over trailing windows."""

    def __init__(self, gc_window_seconds: float, rng: random.Random | None = None) -> None:
        self.gc_window_seconds = gc_window_seconds
        self._buckets: collections.deque[_Bucket] = collections.deque()
        self._rng = rng or random.Random(0)

    def record(self, value: float, now: float) -> None:
        second = int(now)
        if not self._buckets or self._buckets[-1].second != second:
            self._buckets.append(_Bucket(second))
            self._expire(now)
        bucket = self._buckets[-1]
        bucket.seen += 1
        if len(bucket.samples) < BUCKET_CAPACITY:
            bucket.samples.append(value)
        else:
            slot = int(self._rng.random() * bucket.seen)  # uniform in [0, seen); randrange is 10x slower
            if slot < BUCKET_CAPACITY:
                bucket.samples[slot] = value

    def snapshot(self, seconds: float, now: float) -> WindowedHistogram:
        """A copy holding the samples of the last ``seconds`` seconds (cheap: buffer copies)."""
        copy = WindowedHistogram(self.gc_window_seconds, self._rng)
        start = now - seconds
        for bucket in self._buckets:
            if bucket.second + 1 > start:
                kept = _Bucket(bucket.second)
                kept.samples = array("d", bucket.samples)
                copy._buckets.append(kept)
        return copy

    def window(self, seconds: float, now: float) -> np.ndarray:
        """Samples recorded in the last ``seconds`` seconds (one-second granularity)."""
        self._expire(now)
        start = now - seconds
        chunks = [b.samples for b in self._buckets if b.second + 1 > start]
        if not chunks:
            return np.empty(0)
        return np.concatenate([np.frombuffer(c, dtype=np.float64) for c in chunks])

    def _expire(self, now: float) -> None:
        horizon = now - self.gc_window_seconds
        while self._buckets and self._buckets[0].second + 1 <= horizon:
            self._buckets.popleft()


def check_stat_args(
    percentiles: Iterable[float], windows: Iterable[float], gc_window_seconds: float
) -> tuple[list[float], list[float]]:
    """Validate ``stat()`` arguments in the caller; returns them as lists."""
    pcts, wins = list(percentiles), list(windows)
    for name, values in (("percentiles", pcts), ("agg_windows_seconds", wins)):
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ServeTypeError(f"{name} must be numbers, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValidationError(f"{name} must be finite and >= 0, got {value}")
    if any(p > 100 for p in pcts):
        raise ValidationError(f"percentiles must be within [0, 100], got {pcts}")
    if wins and max(wins) > gc_window_seconds:
        raise ValidationError(
            f"the longest aggregation window ({max(wins)} s) exceeds gc_window_seconds "
            f"({gc_window_seconds} s); raise gc_window_seconds in init() or use shorter windows"
        )
    return pcts, wins


def _label(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def percentile_keys(
    name: str,
    hist: WindowedHistogram,
    percentiles: Sequence[float],
    windows: Sequence[float],
    now: float,
) -> dict[str, float]:
    """``{<name>_<p>th_perc_<w>_window: value}``; empty windows are left out."""
    out: dict[str, float] = {}
    for window in windows:
        samples = hist.window(window, now)
        if samples.size == 0:
            continue
        values = np.percentile(samples, percentiles)
        for pct, value in zip(percentiles, values):
            out[f"{name}_{_label(pct)}th_perc_{_label(window)}_window"] = float(value)
    return out

"""Metrics: counters and windowed latency histograms, aggregated by ``stat()``.

Recording is O(1): a sample goes into the open one-second bucket of its completion
time; a bucket keeps at most ``BUCKET_CAPACITY`` samples (reservoir sampling beyond
that). When a later second starts, the open bucket is sealed: appended to an
append-only list and never changed again. Buckets older than ``gc_window_seconds``
expire by moving a start index; once the dead prefix outgrows the live part, the live
tail is copied into a *new* list, so memory stays within about twice the window.

``stat()`` takes a ``HistogramSnapshot`` under the owner's lock, which costs O(1)
(references to the sealed list, two indices and a copy of the open bucket), and
computes percentiles with numpy after releasing it (``percentile_keys``). The owner
serialises ``record`` and ``snapshot`` (a backend's runtime calls both under its lock); a
snapshot is immutable and can be read from any thread.

Times are non-negative monotonic seconds.
"""

from __future__ import annotations

import math
import random
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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


class _Sealed:
    """Sealed buckets in time order, in parallel append-only lists.

    Nothing is ever removed or changed: snapshots hold a reference and an end index,
    so what the histogram appends later, or drops by compacting into a new
    ``_Sealed``, does not affect them.
    """

    __slots__ = ("seconds", "samples", "firsts")

    def __init__(self) -> None:
        self.seconds: list[int] = []  # the second each bucket covers, increasing
        self.samples: list[array[float]] = []
        self.firsts: list[int] = []  # running count of sealed samples before each bucket

    def tail(self, start: int) -> _Sealed:
        """A new ``_Sealed`` with the buckets from ``start`` on (self is left intact)."""
        copy = _Sealed()
        copy.seconds = self.seconds[start:]
        copy.samples = self.samples[start:]
        copy.firsts = self.firsts[start:]
        return copy


class HistogramSnapshot:
    """The samples of a ``WindowedHistogram`` at one instant; immutable.

    Sealed buckets ``start:end`` of ``sealed`` are shared with the histogram (never
    copied); the open bucket is a copy.
    """

    __slots__ = ("taken_at", "sealed", "start", "end", "total", "open_second", "open")

    def __init__(
        self,
        taken_at: float,
        sealed: _Sealed,
        start: int,
        total: int,
        open_second: float,
        open_samples: array[float],
    ) -> None:
        self.taken_at = taken_at
        self.sealed = sealed
        self.start = start
        self.end = len(sealed.seconds)
        self.total = total  # running count of sealed samples after bucket end - 1
        self.open_second = open_second
        self.open = open_samples

    def window(self, seconds: float, now: float | None = None) -> np.ndarray:
        """Samples since ``now - seconds`` (``now`` defaults to ``taken_at``), oldest first.

        One-second granularity: a bucket counts if any part of its second is after
        ``now - seconds``.
        """
        now = self.taken_at if now is None else now
        index, _ = self._first(seconds, now)
        chunks = self.sealed.samples[index : self.end]
        if self._open_in(seconds, now):
            chunks.append(self.open)
        # bytearray.join copies the buffers in one C loop: ~25x faster than np.concatenate of
        # views. The result is writable, so percentile_keys can partition it in place.
        np = numpy_module()
        return np.frombuffer(bytearray().join(chunks), dtype=np.float64)

    def _first(self, seconds: float, now: float) -> tuple[int, int]:
        """Index of the first sealed bucket in the window, and the running count before it."""
        # Bucket s covers [s, s + 1): it is in the window iff s + 1 > now - seconds, i.e. s >= floor(now - seconds).
        index = bisect_left(self.sealed.seconds, math.floor(now - seconds), self.start, self.end)
        return index, self.sealed.firsts[index] if index < self.end else self.total

    def _open_in(self, seconds: float, now: float) -> bool:
        return self.open_second >= math.floor(now - seconds)

    def _count(self, seconds: float, now: float) -> int:
        """How many samples the window holds (no copy)."""
        if not self._open_in(seconds, now):
            return 0  # the open bucket is the newest: every sealed one is older still
        return self.total - self._first(seconds, now)[1] + len(self.open)


class WindowedHistogram:
    """Samples kept by time, for percentiles over trailing windows."""

    def __init__(self, gc_window_seconds: float, rng: random.Random | None = None) -> None:
        self.gc_window_seconds = gc_window_seconds
        self._rng = rng or random.Random(0)
        self._sealed = _Sealed()
        self._start = 0  # sealed buckets before it have expired
        self._total = 0  # running count of sealed samples
        self._open_second: float = -math.inf
        self._open: array[float] = array("d")
        self._seen = 0  # samples offered to the open bucket (for reservoir sampling)

    def record(self, value: float, now: float) -> None:
        second = int(now)
        if second > self._open_second:
            self._roll(second, now)
        # A sample whose second is older than the open bucket's (its thread read the clock
        # before another one recorded) goes into the open bucket: buckets stay in time order.
        self._seen += 1
        samples = self._open
        if len(samples) < BUCKET_CAPACITY:
            samples.append(value)
        else:
            slot = int(self._rng.random() * self._seen)  # uniform in [0, seen); randrange is 10x slower
            if slot < BUCKET_CAPACITY:
                samples[slot] = value

    def record_many(self, values: list[float], now: float) -> None:
        """:meth:`record` of each value at ``now`` (a batch's queries), in one step while they fit."""
        second = int(now)
        if second > self._open_second:
            self._roll(second, now)
        samples = self._open
        if len(samples) + len(values) <= BUCKET_CAPACITY:
            self._seen += len(values)
            samples.extend(values)
            return
        for value in values:  # the bucket fills up: reservoir sampling, value by value
            self.record(value, now)

    def snapshot(self, now: float) -> HistogramSnapshot:
        """The samples as of ``now``, in O(1): sealed buckets are shared, the open one copied.

        Expires what is older than ``gc_window_seconds`` first (amortised O(1)).
        """
        self._expire(now)
        return HistogramSnapshot(now, self._sealed, self._start, self._total, self._open_second, array("d", self._open))

    def window(self, seconds: float, now: float) -> np.ndarray:
        """Samples recorded in the last ``seconds`` seconds (one-second granularity), oldest first."""
        return self.snapshot(now).window(seconds)

    def _roll(self, second: int, now: float) -> None:
        """Seal the open bucket and open one for ``second``."""
        if self._open:
            sealed = self._sealed
            sealed.seconds.append(int(self._open_second))
            sealed.samples.append(self._open)
            sealed.firsts.append(self._total)
            self._total += len(self._open)
        self._open = array("d")
        self._seen = 0
        self._open_second = second
        self._expire(now)

    def _expire(self, now: float) -> None:
        horizon = math.floor(now - self.gc_window_seconds)  # bucket s is kept iff s + 1 > now - gc, i.e. s >= horizon
        sealed = self._sealed
        self._start = bisect_left(sealed.seconds, horizon, self._start)
        if self._start * 2 > len(sealed.seconds):
            # The dead prefix outgrew the live part: copy the live tail into a new list (amortised
            # O(1) per bucket) rather than deleting in place, which snapshots holding this one would see.
            self._sealed = sealed.tail(self._start)
            self._start = 0
        if self._open_second < horizon:
            self._open = array("d")
            self._seen = 0


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
    snapshot: HistogramSnapshot,
    percentiles: Sequence[float],
    windows: Sequence[float],
    now: float | None = None,
) -> dict[str, float]:
    """Percentiles of a snapshot over trailing windows; call it outside the owner's lock.

    Args:
        name: the key prefix, e.g. ``"<backend>_latency_s"``.
        snapshot: from ``WindowedHistogram.snapshot``.
        percentiles: in [0, 100].
        windows: window lengths in seconds.
        now: where the windows end; defaults to the snapshot's ``taken_at``. A window
            has no upper bound: it holds whatever the snapshot holds after ``now - w``.

    Returns:
        ``{<name>_<p>th_perc_<w>_window: value}``, in the order of ``windows`` then
        ``percentiles``; windows without samples are left out.
    """
    if not windows:
        return {}
    now = snapshot.taken_at if now is None else now
    # Buckets are in time order, so every window is a suffix of the longest: copy that once.
    samples = snapshot.window(max(windows), now)
    counts = {window: snapshot._count(window, now) for window in windows}
    values: dict[float, Any] = {}
    np = numpy_module()
    # Shortest first: the whole buffer goes last and is partitioned in place (it is ours),
    # which saves a copy of the largest window (and its page faults).
    for window, count in sorted(counts.items(), key=lambda item: item[1]):
        if count:
            part = samples[samples.size - count :]
            values[window] = np.percentile(part, percentiles, overwrite_input=count == samples.size)
    out: dict[str, float] = {}
    for window in windows:
        if window in values:
            for pct, value in zip(percentiles, values[window]):
                out[f"{name}_{_label(pct)}th_perc_{_label(window)}_window"] = float(value)
    return out


def numpy_module() -> Any:
    """numpy, imported on first use: ``import serve_core`` stays fast (numpy takes ~0.1 s to import)."""
    import numpy

    return numpy

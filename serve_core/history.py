"""``History``: the last minutes of an instance's traffic, sampled in memory for the dashboard.

A sampler on the instance's clock timers (:meth:`Clock.call_later`, so a
:class:`~serve_core.testing.FakeClock` drives it in tests) reads ``stat()`` once every
``interval_s`` and appends one :class:`Point` to a ring of ``horizon_s / interval_s`` points
(600 by default: ten minutes at one a second); the oldest point falls out as a new one comes
in, so memory is bounded by that count times the number of endpoints and backends.

A point holds, per endpoint and per backend, the request and error rates since the previous
point (from ``stat()``'s counters; a counter that went back, a backend replaced by new code,
counts from zero) and the p50/p95/p99 latency of the calls that finished in about the last
interval. A backend's percentiles are ``stat()``'s, over its shortest window (one-second
buckets), exact. ``stat()`` has no latency per endpoint: an endpoint's comes from the
Prometheus latency histogram (``latency_counts``, the instance's ``Metrics.latency_counts``),
the calls that finished since the previous point, interpolated within their buckets as
Prometheus' ``histogram_quantile`` does, so it is as fine as the buckets (by default 0.5 ms
to a minute; below 0.5 ms it reads as a fraction of the first bucket). Without those counts
(metrics off, or shared between worker processes) an endpoint's latency is the slowest of the
backends its traffic goes to, an upper bound of its own percentile.

Everything is read through the instance's public methods (``stat``, ``get_traffic_policy``,
``running``); nothing here imports the HTTP layer.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from .clock import Clock, Timer
from .errors import ServeError

PERCENTILES = (50, 95, 99)
FIELDS = ("rps", "eps", "p50", "p95", "p99")
"""What each series holds per point: requests/s, errors/s, latency percentiles (seconds)."""

DEFAULT_INTERVAL_S = 1.0
DEFAULT_HORIZON_S = 600.0

Values = tuple[float | None, ...]  # one per FIELDS entry; None: not known at that point
LatencyCounts = Callable[[], "tuple[tuple[float, ...], dict[str, list[int]]] | None"]
_UNKNOWN: Values = (None,) * len(PERCENTILES)


class StatSource(Protocol):
    """What the sampler reads of a serving instance (``Serve`` has all of it)."""

    @property
    def running(self) -> bool: ...

    def stat(self, percentiles: Sequence[float] = ..., agg_windows_seconds: Sequence[float] = ...) -> dict[str, float]:
        ...

    def get_traffic_policy(self, endpoint_name: str) -> dict[str, float]: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Point:
    """One sample: its sequence number, wall time, and the values of each endpoint and backend."""

    seq: int
    wall: float
    endpoints: dict[str, Values]
    backends: dict[str, Values]


def _between(key: str, prefix: str, suffix: str) -> str | None:
    if key.startswith(prefix) and key.endswith(suffix) and len(key) > len(prefix) + len(suffix):
        return key[len(prefix) : len(key) - len(suffix)]
    return None


def _label(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


class History:
    """A bounded ring of :class:`Point` s, filled by a sampler on ``clock``'s timers.

    Args:
        source: the instance sampled (a :class:`~serve_core.Serve`).
        clock: its clock (timers and time).
        interval_s: seconds between points.
        horizon_s: how far back points are kept; the ring holds ``ceil(horizon_s / interval_s)``.
        window_s: the ``stat()`` window the latency percentiles are read over (defaults to
            ``interval_s``; at most the instance's ``gc_window_seconds``).
        latency_counts: the bucket bounds and per-endpoint latency bucket counts since the
            start (``Metrics.latency_counts``), or None; without it endpoints get the upper bound.
    """

    def __init__(
        self,
        source: StatSource,
        clock: Clock,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        horizon_s: float = DEFAULT_HORIZON_S,
        window_s: float | None = None,
        latency_counts: LatencyCounts | None = None,
    ) -> None:
        for name, value in (("interval_s", interval_s), ("horizon_s", horizon_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        self._source = source
        self._clock = clock
        self.interval_s = float(interval_s)
        self.horizon_s = float(horizon_s)
        self.window_s = float(window_s if window_s is not None else interval_s)
        self.capacity = max(1, math.ceil(horizon_s / interval_s))
        self._points: collections.deque[Point] = collections.deque(maxlen=self.capacity)
        self._counters: dict[str, tuple[float, float, float]] = {}  # series -> (requests, errors, at)
        self._latency_counts = latency_counts
        self._buckets: dict[str, list[int]] | None = None  # endpoint -> latency bucket counts at the last point
        self._seq = 0
        self._lock = threading.Lock()
        self._timer: Timer | None = None
        self._when: Callable[[], bool] | None = None
        self._stopped = False

    # ------------------------------------------------------------ sampler
    def start(self, when: Callable[[], bool] | None = None) -> None:
        """Sample every ``interval_s`` from now on, while the source runs (and ``when()`` holds, if given)."""
        with self._lock:
            if self._timer is not None or self._stopped:
                return
            self._when = when
            self._timer = self._clock.call_later(self.interval_s, self._tick)

    def stop(self) -> None:
        """No more samples (the points stay readable). Idempotent."""
        with self._lock:
            self._stopped = True
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    @property
    def sampling(self) -> bool:
        """Whether the sampler's timer is armed."""
        return self._timer is not None

    def _tick(self) -> None:
        if not self._source.running:
            self.stop()
            return
        try:
            if self._when is None or self._when():
                self.sample()
        finally:
            with self._lock:
                if not self._stopped:
                    self._timer = self._clock.call_later(self.interval_s, self._tick)

    def sample(self) -> Point | None:
        """Take one point now (the sampler calls this; tests may too); ``None`` if ``stat()`` failed."""
        try:
            stats = self._source.stat(PERCENTILES, (self.window_s,))
        except ServeError:  # e.g. the instance is stopping: skip this point
            return None
        now, wall = self._clock.monotonic(), self._clock.wall()
        backends = {tag: self._values("b/" + tag, tag, stats, now) for tag in _backends(stats)}
        measured = self._measured_latency()
        endpoints = {}
        for name in _endpoints(stats):
            counters = f"endpoint_{name}_request_counter", f"endpoint_{name}_error_counter"
            latency = measured.get(name, _UNKNOWN) if measured is not None else self._endpoint_latency(name, backends)
            endpoints[name] = self._rates("e/" + name, stats, *counters, now) + latency
        with self._lock:
            live = {"b/" + tag for tag in backends} | {"e/" + name for name in endpoints}
            for key in [key for key in self._counters if key not in live]:
                del self._counters[key]  # series gone from stat(): no counters kept for them
            self._seq += 1
            point = Point(self._seq, wall, endpoints, backends)
            self._points.append(point)
        return point

    def _values(self, key: str, tag: str, stats: Mapping[str, float], now: float) -> Values:
        rates = self._rates(key, stats, f"{tag}_request_counter", f"{tag}_error_counter", now)
        window = _label(self.window_s)
        latency = tuple(stats.get(f"{tag}_latency_s_{p}th_perc_{window}_window") for p in PERCENTILES)
        return rates + latency

    def _rates(self, key: str, stats: Mapping[str, float], requests_key: str, errors_key: str, now: float) -> Values:
        """Requests/s and errors/s since the previous point (None at a series' first point)."""
        requests, errors = float(stats.get(requests_key, 0)), float(stats.get(errors_key, 0))
        with self._lock:
            before = self._counters.get(key)
            self._counters[key] = (requests, errors, now)
        if before is None or now <= before[2]:
            return (None, None)
        elapsed = now - before[2]
        # A counter that went back belongs to a new runtime (new code): it counted from zero.
        new_requests = requests - before[0] if requests >= before[0] else requests
        new_errors = errors - before[1] if errors >= before[1] else errors
        return (new_requests / elapsed, new_errors / elapsed)

    def _measured_latency(self) -> dict[str, Values] | None:
        """Per endpoint, percentiles of the calls since the previous point, from the latency buckets."""
        counted = self._latency_counts() if self._latency_counts is not None else None
        if counted is None:
            return None
        bounds, totals = counted
        out: dict[str, Values] = {}
        with self._lock:
            before, self._buckets = self._buckets, {name: list(counts) for name, counts in totals.items()}
        if before is None:
            return out  # the first point: no interval yet
        for name, counts in totals.items():
            last = before.get(name)  # none: the endpoint's calls all came since the last point
            new = counts if last is None else [a - b for a, b in zip(counts, last)]
            out[name] = tuple(bucket_quantile(bounds, new, p / 100) for p in PERCENTILES)
        return out

    def _endpoint_latency(self, name: str, backends: Mapping[str, Values]) -> Values:
        try:
            weights = self._source.get_traffic_policy(name)
        except (ServeError, KeyError):  # no traffic yet, or the endpoint is gone
            return (None,) * len(PERCENTILES)
        parts = [backends[tag][2:] for tag, weight in weights.items() if weight > 0 and tag in backends]
        out: list[float | None] = []
        for index in range(len(PERCENTILES)):
            known = [value for values in parts if (value := values[index]) is not None]
            out.append(max(known) if known else None)
        return tuple(out)

    # ------------------------------------------------------------ reading
    def __len__(self) -> int:
        with self._lock:
            return len(self._points)

    def points(self) -> list[Point]:
        """The points kept, oldest first."""
        with self._lock:
            return list(self._points)

    def latest(self) -> Point | None:
        with self._lock:
            return self._points[-1] if self._points else None

    def series(self, since: int = 0) -> dict[str, Any]:
        """The points after sequence number ``since``, as JSON-ready columns.

        Returns:
            ``{"seq": last, "t": [wall, ...], "endpoints": {name: {field: [...]}},
            "backends": {tag: {field: [...]}}}``; a field is ``None`` at points where it
            was not known (a series that did not exist then, a window without calls).
        """
        with self._lock:
            points = [point for point in self._points if point.seq > since]
            last = self._seq
        return {
            "seq": last,
            "t": [round(point.wall, 3) for point in points],
            "endpoints": _columns(points, "endpoints"),
            "backends": _columns(points, "backends"),
        }

    def __repr__(self) -> str:
        return f"<History {len(self)}/{self.capacity} points every {self.interval_s:g} s>"


def bucket_quantile(bounds: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile of values counted in buckets, linear within the bucket it falls in.

    ``counts[i]`` values lie in ``(bounds[i-1], bounds[i]]`` (from 0 for the first); the last
    count is of values past every bound, which read as the last bound. None without values.
    """
    total = sum(counts)
    if total <= 0 or any(count < 0 for count in counts):
        return None
    rank = q * total
    below = 0
    for index, count in enumerate(counts):
        if count and below + count >= rank:
            if index >= len(bounds):
                return float(bounds[-1])
            lower = bounds[index - 1] if index else 0.0
            return lower + (bounds[index] - lower) * max(0.0, rank - below) / count
        below += count
    return float(bounds[-1])


def _backends(stats: Mapping[str, float]) -> list[str]:
    return sorted(tag for key in stats if (tag := _between(key, "backend_", "_num_replicas")) is not None)


def _endpoints(stats: Mapping[str, float]) -> list[str]:
    return sorted(name for key in stats if (name := _between(key, "endpoint_", "_request_counter")) is not None)


def _columns(points: list[Point], kind: str) -> dict[str, dict[str, list[float | None]]]:
    names = sorted({name for point in points for name in getattr(point, kind)})
    out: dict[str, dict[str, list[float | None]]] = {}
    for name in names:
        rows = [getattr(point, kind).get(name) for point in points]
        out[name] = {
            field: [None if row is None or (value := row[index]) is None else _round(value) for row in rows]
            for index, field in enumerate(FIELDS)
        }
    return out


def _round(value: float) -> float:
    """Four significant digits: the chart needs no more, and the JSON is a third the size."""
    return float(f"{value:.4g}")

"""Prometheus metrics of an instance: what the hot path records, and the registry of it.

Metric families (docs/metrics.md has the full reference):

====================================  =========  ==============================  ================================
name                                  type       labels                          counts
====================================  =========  ==============================  ================================
``serve_core_requests_total``         counter    endpoint, backend               every query, once, when answered
``serve_core_errors_total``           counter    endpoint, backend, kind         queries answered with an error
``serve_core_request_latency_seconds`` histogram endpoint, backend, phase        queries that ran on a replica
``serve_core_batch_size``             histogram  backend                         replica calls
``serve_core_queue_length``           gauge      backend                         queued queries
``serve_core_in_flight``              gauge      backend                         queries held by replicas
``serve_core_replicas``               gauge      backend, state                  desired and running replicas
``serve_core_streams_total``          counter    endpoint, backend               streams ended (docs/streaming.md)
``serve_core_stream_items_total``     counter    endpoint, backend               items the streams produced
``serve_core_stream_seconds_total``   counter    endpoint, backend               their durations, first item to end
====================================  =========  ==============================  ================================

Recording costs three float appends per query under the lock the recording code already
holds (a backend runtime's, the router's): a :class:`LocalMeter` buffers per ``(endpoint,
backend)`` and buckets a buffer with numpy every thousand queries or at a scrape; nothing
here imports ``prometheus_client``. The export (:mod:`serve_core.http.metrics`, imported on the first
scrape) reads the meters and computes the gauges from the runtimes when scraped.

Several worker processes (``gunicorn -w N``) each hold an instance, and a scrape reaches
one of them. With ``PROMETHEUS_MULTIPROC_DIR`` set, every worker therefore writes through
to prometheus-client's multiprocess files instead (:class:`serve_core.http.metrics.SharedMeter`,
about ten times the cost of a local record) and sets its gauges every
``MetricsConfig.multiprocess_refresh_s`` and before it answers a scrape.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .clock import Clock, Timer
from .errors import (
    BackPressureError,
    DeadlineExceededError,
    LoopBackError,
    NotFoundError,
    ReplicaDiedError,
    RequestTimeoutError,
    ServeStateError,
    ServeTypeError,
    ShuttingDownError,
    ValidationError,
)
from .metrics import numpy_module

if TYPE_CHECKING:
    from .executors.base import Outcome
    from .queues import Query

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

DEFAULT_LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
"""Upper bounds (seconds) of the latency histogram; ``+Inf`` is always added. From 0.5 ms, since a
no-op call takes tens of microseconds, to a minute."""

DEFAULT_BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Upper bounds of the batch size histogram; ``+Inf`` is always added."""

PHASES = ("queue", "batch_wait", "execution", "total")
"""Values of the latency histogram's ``phase`` label: queued until a replica was free, held by a
free replica for its batch to fill, the replica call, and arrival to answer (the sum of the three)."""

ERROR_KINDS = ("user_error", "deadline", "backpressure", "replica_died", "timeout", "shutdown", "loop_back")
"""Values of ``serve_core_errors_total``'s ``kind`` label (see :func:`error_kind`)."""


def error_kind(error: BaseException) -> str:
    """The ``kind`` an error answered by serve_core counts as (``user_error`` for anything the backend raised)."""
    if isinstance(error, RequestTimeoutError):
        return "timeout"
    if isinstance(error, DeadlineExceededError):
        return "deadline"
    if isinstance(error, BackPressureError):
        return "backpressure"
    if isinstance(error, ReplicaDiedError):
        return "replica_died"
    if isinstance(error, ShuttingDownError):
        return "shutdown"
    if isinstance(error, LoopBackError):
        return "loop_back"
    return "user_error"


def _buckets(name: str, value: Any) -> tuple[float, ...]:
    """Validated upper bounds: finite, positive, strictly increasing; a trailing +Inf is dropped."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ServeTypeError(f"{name} must be a sequence of numbers, got {type(value).__name__}")
    bounds = list(value)
    if bounds and bounds[-1] == math.inf:
        bounds.pop()
    for bound in bounds:
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) or bound <= 0:
            raise ValidationError(f"{name} must hold finite numbers > 0, got {bound!r}")
    if not bounds or any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ValidationError(f"{name} must be non-empty and strictly increasing, got {tuple(value)!r}")
    return tuple(float(bound) for bound in bounds)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    """What an instance records and adds to HTTP responses: ``Serve(metrics=MetricsConfig(...))``.

    ``Serve(metrics=True)`` (the default) is ``MetricsConfig()``; ``metrics=False`` is
    ``MetricsConfig(enabled=False)``.

    Attributes:
        enabled: record the Prometheus metrics (``/-/metrics``, ``Serve.metrics_app()``).
        latency_buckets: upper bounds in seconds of ``serve_core_request_latency_seconds``.
        batch_size_buckets: upper bounds of ``serve_core_batch_size``.
        request_ids: take, or generate, an ``X-Request-ID`` per HTTP request, pass it to the
            backend (``serve.context.request_id``) and return it.
        server_timing: add a ``Server-Timing`` header (queue, batch wait, execution, backend).
        multiprocess_refresh_s: under ``PROMETHEUS_MULTIPROC_DIR``, how often a worker sets its gauges.
    """

    enabled: bool = True
    latency_buckets: tuple[float, ...] = DEFAULT_LATENCY_BUCKETS
    batch_size_buckets: tuple[float, ...] = DEFAULT_BATCH_SIZE_BUCKETS
    request_ids: bool = True
    server_timing: bool = True
    multiprocess_refresh_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("enabled", "request_ids", "server_timing"):
            if not isinstance(getattr(self, name), bool):
                raise ServeTypeError(f"MetricsConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("latency_buckets", "batch_size_buckets"):
            object.__setattr__(self, name, _buckets(f"MetricsConfig.{name}", getattr(self, name)))
        refresh = self.multiprocess_refresh_s
        if isinstance(refresh, bool) or not isinstance(refresh, (int, float)) or not 0 < refresh < math.inf:
            raise ValidationError(f"MetricsConfig.multiprocess_refresh_s must be a positive number, got {refresh!r}")

    @classmethod
    def of(cls, value: bool | MetricsConfig) -> MetricsConfig:
        """The config for ``Serve(metrics=value)``."""
        if isinstance(value, MetricsConfig):
            return value
        if isinstance(value, bool):
            return cls(enabled=value)
        raise ServeTypeError(f"metrics must be a bool or a MetricsConfig, got {type(value).__name__}")


@dataclasses.dataclass(frozen=True, slots=True)
class BackendLoad:
    """A backend runtime's gauges at one instant."""

    queued: int
    in_flight: int
    desired: int
    running: int


LoadSource = Callable[[], "BackendLoad | None"]  # None once the runtime is closed


class Meter(Protocol):
    """Where one backend's (or the front's) queries are counted; called under its owner's lock."""

    backend: str
    load: LoadSource | None

    def finished(self, queries: Sequence[Query], outcomes: Sequence[Outcome], now: float) -> None:
        """A replica call ended: a request, four latency phases and maybe a user error per query."""

    def answered(self, queries: Iterable[Query], kind: str | None) -> None:
        """Queries answered without running: with error ``kind``, or dropped (cancelled) when None."""

    def error(self, endpoint: str, kind: str) -> None:
        """An error whose request is counted elsewhere (the HTTP front's timeout)."""

    def streamed(self, query: Query, items: int, seconds: float) -> None:
        """A stream ended (its query was counted by :meth:`finished`): its items and duration."""


@dataclasses.dataclass
class Series:
    """The totals of one ``(endpoint, backend)`` in a snapshot: requests, errors, latency per phase.

    ``counts`` holds per-bucket (not cumulative) counts, the buckets of one phase after
    another (:data:`PHASES` order, ``len(bounds) + 1`` buckets each, the last past every
    bound); ``sums`` the sum of each phase.
    """

    requests: int
    errors: dict[str, int]
    counts: list[int]
    sums: list[float]

    def add(self, other: Series) -> None:
        self.requests += other.requests
        for kind, number in other.errors.items():
            self.errors[kind] = self.errors.get(kind, 0) + number
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.sums = [a + b for a, b in zip(self.sums, other.sums)]


FOLD_AT = 3 * 1024
"""Samples (three floats per query) an endpoint's buffer holds before numpy buckets them."""


class _Counts:
    """What the hot path keeps per endpoint; :meth:`LocalMeter.snapshot` completes it to a :class:`Series`.

    A query that ran appends three floats (queue, execution, total seconds) to ``samples``;
    every :data:`FOLD_AT` floats, and before a snapshot, :meth:`fold` buckets them with numpy in
    one pass (so a query costs three appends, not three ``bisect``s and six increments). Also
    left to the snapshot: a query that ran counts as a request through its ``total`` bucket, a
    zero batch wait (no batching: the common case) is not recorded but derived (queries that
    ran minus nonzero waits), and the ``total`` sum is the sum of the others.
    """

    __slots__ = ("answered", "errors", "samples", "counts", "sums")

    def __init__(self, width: int) -> None:
        self.answered = 0  # requests answered without running (refused, expired, dropped...)
        self.errors: dict[str, int] = {}
        self.samples = array("d")
        np = numpy_module()
        self.counts = np.zeros(len(PHASES) * width, dtype=np.int64)  # per phase, per bucket
        self.sums = np.zeros(3)  # queue, batch_wait, execution

    def fold(self, bounds: Any) -> None:
        """Bucket the buffered samples into ``counts`` and ``sums``, and empty the buffer."""
        if not self.samples:
            return
        np = numpy_module()
        width = len(bounds) + 1
        values = np.frombuffer(self.samples, dtype=np.float64).reshape(-1, 3)
        for column, phase in ((0, 0), (1, 2), (2, 3)):  # queue, execution, total
            # searchsorted(side="left") is bisect_left: a value equal to a bound is in its bucket (le).
            indices = np.searchsorted(bounds, values[:, column], side="left")
            self.counts[phase * width : (phase + 1) * width] += np.bincount(indices, minlength=width)
        self.sums[0] += values[:, 0].sum()
        self.sums[2] += values[:, 1].sum()
        del values  # a view of the buffer: the buffer is replaced, not resized under it
        self.samples = array("d")


@dataclasses.dataclass(frozen=True)
class MeterSnapshot:
    """A meter's totals, taken under its lock: per endpoint, and the batch size histogram."""

    backend: str
    series: dict[str, Series]
    batch_counts: list[int]
    batch_sum: float
    streams: dict[str, tuple[int, int, float]] = dataclasses.field(default_factory=dict)  # endpoint -> totals


class LocalMeter:
    """Counts kept in this process, recorded under ``lock`` (held by the caller) and read at scrape.

    Args:
        backend: the ``backend`` label ("" for queries that never reached one).
        lock: the lock every recording call holds; :meth:`snapshot` takes it.
        load: the gauges of the backend's runtime.
        config: the bucket bounds.
    """

    __slots__ = (
        "backend", "lock", "load", "_bounds", "_bounds_array", "_width", "_sizes", "_series",
        "_batch_counts", "_batch_sum", "_streams",
    )

    def __init__(self, backend: str, lock: Any, load: LoadSource | None, config: MetricsConfig) -> None:
        self.backend = backend
        self.lock = lock
        self.load = load
        self._bounds = config.latency_buckets
        self._bounds_array = numpy_module().array(self._bounds)
        self._width = len(self._bounds) + 1
        self._sizes = config.batch_size_buckets
        self._series: dict[str, _Counts] = {}
        # Calls of more than one query only: single calls are the queries that ran minus these.
        self._batch_counts = [0] * (len(self._sizes) + 1)
        self._batch_sum = 0
        self._streams: dict[str, tuple[int, int, float]] = {}  # endpoint -> streams, items, seconds

    def _new(self, endpoint: str) -> _Counts:
        counts = self._series[endpoint] = _Counts(self._width)
        return counts

    def finished(self, queries: Sequence[Query], outcomes: Sequence[Outcome], now: float) -> None:
        if len(queries) == 1:  # the common case, unrolled
            query = queries[0]
            series = self._series.get(query.endpoint) or self._new(query.endpoint)
            samples = series.samples
            dispatched, arrival, waited = query.dispatched, query.arrival, query.batch_wait
            samples.append(dispatched - arrival - waited)
            samples.append(now - dispatched)
            samples.append(now - arrival)
            if waited:
                self._waited(series, waited)
            if not outcomes[0].ok:
                series.errors["user_error"] = series.errors.get("user_error", 0) + 1
            if len(samples) >= FOLD_AT:
                series.fold(self._bounds_array)
            return
        self._batch_counts[bisect_left(self._sizes, len(queries))] += 1
        self._batch_sum += len(queries)
        execution = now - queries[0].dispatched
        for query, outcome in zip(queries, outcomes):
            series = self._series.get(query.endpoint) or self._new(query.endpoint)
            waited = query.batch_wait
            series.samples.extend((query.dispatched - query.arrival - waited, execution, now - query.arrival))
            if waited:
                self._waited(series, waited)
            if not outcome.ok:
                series.errors["user_error"] = series.errors.get("user_error", 0) + 1
            if len(series.samples) >= FOLD_AT:
                series.fold(self._bounds_array)

    def _waited(self, series: _Counts, waited: float) -> None:
        """A nonzero batch wait (batching backends only): bucketed at once."""
        series.counts[self._width + bisect_left(self._bounds, waited)] += 1
        series.sums[1] += waited

    def answered(self, queries: Iterable[Query], kind: str | None) -> None:
        for query in queries:
            series = self._series.get(query.endpoint) or self._new(query.endpoint)
            series.answered += 1
            if kind is not None:
                series.errors[kind] = series.errors.get(kind, 0) + 1

    def error(self, endpoint: str, kind: str) -> None:
        series = self._series.get(endpoint) or self._new(endpoint)
        series.errors[kind] = series.errors.get(kind, 0) + 1

    def streamed(self, query: Query, items: int, seconds: float) -> None:
        streams, produced, total = self._streams.get(query.endpoint, (0, 0, 0.0))
        self._streams[query.endpoint] = (streams + 1, produced + items, total + seconds)

    def snapshot(self) -> MeterSnapshot:
        """The totals, the derived counts filled in (buffers folded and copied under the lock)."""
        with self.lock:
            raw = []
            for endpoint, kept in self._series.items():
                kept.fold(self._bounds_array)
                raw.append((endpoint, kept.answered, dict(kept.errors), kept.counts.tolist(), kept.sums.tolist()))
            batch_counts, batch_sum = list(self._batch_counts), self._batch_sum
            streams = dict(self._streams)
        width = self._width
        series: dict[str, Series] = {}
        ran_in_all = 0
        for endpoint, answered, errors, bucket_counts, (queue, batch_wait, execution) in raw:
            ran = sum(bucket_counts[3 * width :])
            ran_in_all += ran
            bucket_counts[width] += ran - sum(bucket_counts[width : 2 * width])  # zero batch waits: first bucket
            sums = [queue, batch_wait, execution, queue + batch_wait + execution]
            series[endpoint] = Series(answered + ran, errors, bucket_counts, sums)
        singles = ran_in_all - batch_sum
        batch_counts[bisect_left(self._sizes, 1)] += singles
        return MeterSnapshot(self.backend, series, batch_counts, float(batch_sum + singles), streams)


class Metrics:
    """An instance's meters (one per backend runtime, the router's, the HTTP front's) and their export.

    Args:
        config: what to record (``enabled=False``: :meth:`meter` returns None, nothing is recorded).
        clock: runs the gauge refresh timer of multiprocess mode.
    """

    def __init__(self, config: MetricsConfig, clock: Clock) -> None:
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()  # the list of meters, and the front's meter
        self._meters: list[Any] = []
        self._exporter: Any = None
        self._shared: Any = None  # the multiprocess families, under PROMETHEUS_MULTIPROC_DIR
        self._timer: Timer | None = None
        self._closed = False
        if config.enabled and os.environ.get(MULTIPROC_ENV):
            from .http.metrics import SharedFamilies  # lazy: prometheus-client only when used

            self._shared = SharedFamilies(config)
            self._timer = clock.call_later(config.multiprocess_refresh_s, self._tick)
        self._front = self.meter("", self._lock, None)

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    @property
    def multiprocess(self) -> bool:
        """True when every worker writes through to ``PROMETHEUS_MULTIPROC_DIR``."""
        return self._shared is not None

    def meter(self, backend: str, lock: Any, load: LoadSource | None) -> Meter | None:
        """A new meter for a backend runtime (or the router, ``backend=""``); None when metrics are off.

        Meters of one tag (a runtime replaced by a new one) add up in the export.
        """
        if not self.config.enabled:
            return None
        meter: Meter
        if self._shared is not None:
            meter = self._shared.meter(backend, load)
        else:
            meter = LocalMeter(backend, lock, load, self.config)
        with self._lock:
            self._meters.append(meter)
        return meter

    def front_error(self, endpoint: str, kind: str) -> None:
        """Count an error of the HTTP front (``kind="timeout"``): its query is counted where it ends."""
        if self._front is not None:
            with self._lock:
                self._front.error(endpoint, kind)

    def meters(self) -> list[Any]:
        with self._lock:
            return list(self._meters)

    def latency_counts(self) -> tuple[tuple[float, ...], dict[str, list[int]]] | None:
        """The bucket bounds, and per endpoint the per-bucket (not cumulative) counts of the ``total``
        latency phase since this instance started, over all its meters; the last bucket is past every
        bound. None when metrics are off or shared between processes (each worker's are not its own).
        """
        if not self.config.enabled or self._shared is not None:
            return None
        width = len(self.config.latency_buckets) + 1
        start = PHASES.index("total") * width
        totals: dict[str, list[int]] = {}
        for meter in self.meters():
            for endpoint, series in meter.snapshot().series.items():
                if not endpoint:
                    continue
                counts = series.counts[start : start + width]
                known = totals.get(endpoint)
                totals[endpoint] = counts if known is None else [a + b for a, b in zip(known, counts)]
        return self.config.latency_buckets, totals

    def loads(self) -> dict[str, BackendLoad]:
        """The gauges of every live runtime, summed per backend tag."""
        totals: dict[str, BackendLoad] = {}
        for meter in self.meters():
            load = meter.load() if meter.load is not None else None
            if load is None:
                continue
            seen = totals.get(meter.backend)
            if seen is not None:
                load = BackendLoad(*(a + b for a, b in zip(dataclasses.astuple(seen), dataclasses.astuple(load))))
            totals[meter.backend] = load
        return totals

    def refresh(self) -> None:
        """Multiprocess mode: write this worker's gauges now (before a scrape; also on a timer)."""
        if self._shared is not None:
            self._shared.set_gauges(self.loads())

    def exporter(self) -> Any:
        """The :class:`serve_core.http.metrics.Exporter` of this instance (built on first use).

        Raises:
            NotFoundError: metrics are disabled on this instance.
            ServeStateError: prometheus-client is not installed.
        """
        if not self.config.enabled:
            raise NotFoundError("metrics are disabled on this instance (Serve(metrics=False))")
        if self._exporter is None:
            try:
                from .http.metrics import Exporter  # lazy: prometheus-client only when scraped
            except ImportError as exc:
                raise ServeStateError(
                    f"exporting metrics needs prometheus-client: pip install 'serve-core[metrics]' ({exc})"
                ) from exc
            self._exporter = Exporter(self)
        return self._exporter

    def _tick(self) -> None:
        try:
            self.refresh()
        finally:
            with self._lock:
                if not self._closed:
                    self._timer = self._clock.call_later(self.config.multiprocess_refresh_s, self._tick)

    def close(self) -> None:
        """Stop the gauge timer; in multiprocess mode, this worker's gauges drop to zero."""
        with self._lock:
            self._closed = True
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        if self._shared is not None:
            self._shared.set_gauges({})

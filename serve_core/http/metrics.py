"""Exporting an instance's metrics with prometheus-client (``pip install serve-core[metrics]``).

Imported only when metrics are scraped (``GET /-/metrics``, :meth:`Serve.metrics_app`) or
when ``PROMETHEUS_MULTIPROC_DIR`` is set; the recording side is :mod:`serve_core.prom`.

* One process: :class:`ServeCollector` is a prometheus-client collector that reads the
  instance's :class:`~serve_core.prom.LocalMeter` counts and computes the gauges from the
  runtimes when it is scraped, so recording costs nothing beyond those counts.
* Several worker processes (gunicorn, Granian) with ``PROMETHEUS_MULTIPROC_DIR``: each
  worker's :class:`SharedMeter` writes through to prometheus-client metric objects, whose
  values live in the directory's memory-mapped files, and its gauges are set values
  (``multiprocess_mode="livesum"``: summed over the live workers, since each runs its own
  queues and replicas). A scrape on any worker reads every worker's files through
  prometheus-client's ``MultiProcessCollector``. docs/metrics.md has the setup.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..errors import ServeStateError
from ..prom import MULTIPROC_ENV, PHASES, BackendLoad, LoadSource, MetricsConfig, Series

if TYPE_CHECKING:
    from ..executors.base import Outcome
    from ..prom import Metrics
    from ..queues import Query

HELP = {
    "requests": "Queries answered, from HTTP and from handles, by endpoint and backend.",
    "errors": "Queries answered with an error, by kind: user_error, deadline, backpressure, "
    "replica_died, timeout (HTTP request timeout), shutdown.",
    "latency": "Seconds per query and phase: queue, batch_wait, execution, total.",
    "batch_size": "Queries per replica call.",
    "queue_length": "Queries queued for a backend.",
    "in_flight": "Queries held by a backend's replicas.",
    "replicas": "Replicas of a backend: desired and running.",
    "streams": "Streams (generator backends) ended, by endpoint and backend.",
    "stream_items": "Items the streams produced.",
    "stream_seconds": "Seconds the streams ran, from the first item to the end.",
}
STREAM_FAMILIES = ("streams", "stream_items", "stream_seconds")
REQUEST_LABELS = ("endpoint", "backend")
ERROR_LABELS = ("endpoint", "backend", "kind")
LATENCY_LABELS = ("endpoint", "backend", "phase")


class ServeCollector(Collector):
    """A prometheus-client collector over one process's meters (single-process mode)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        config = self._metrics.config
        series: dict[tuple[str, str], Series] = {}
        batches: dict[str, tuple[list[int], float]] = {}
        streams: dict[tuple[str, str], list[float]] = {}
        for meter in self._metrics.meters():
            snapshot = meter.snapshot()
            for endpoint, counts in snapshot.series.items():
                _merge(series, (endpoint, snapshot.backend), counts)
            for endpoint, totals in snapshot.streams.items():
                kept = streams.setdefault((endpoint, snapshot.backend), [0, 0, 0.0])
                for index, value in enumerate(totals):
                    kept[index] += value
            if any(snapshot.batch_counts):
                seen = batches.get(snapshot.backend)
                if seen is not None:
                    snapshot_counts = [a + b for a, b in zip(seen[0], snapshot.batch_counts)]
                    batches[snapshot.backend] = (snapshot_counts, seen[1] + snapshot.batch_sum)
                else:
                    batches[snapshot.backend] = (snapshot.batch_counts, snapshot.batch_sum)
        yield from _counters(series)
        yield _latency(series, config.latency_buckets)
        batch = HistogramMetricFamily("serve_core_batch_size", HELP["batch_size"], labels=("backend",))
        for backend, (counts, total) in sorted(batches.items()):
            batch.add_metric([backend], _cumulative(counts, config.batch_size_buckets), total)
        yield batch
        yield from _streams(streams)
        yield from _gauges(self._metrics.loads())


def _merge(into: dict[tuple[str, str], Series], key: tuple[str, str], counts: Series) -> None:
    seen = into.get(key)
    if seen is None:
        into[key] = counts
        return
    seen.requests += counts.requests
    for kind, number in counts.errors.items():
        seen.errors[kind] = seen.errors.get(kind, 0) + number
    seen.counts = [a + b for a, b in zip(seen.counts, counts.counts)]
    seen.sums = [a + b for a, b in zip(seen.sums, counts.sums)]


def _counters(series: dict[tuple[str, str], Series]) -> Iterator[Metric]:
    requests = CounterMetricFamily("serve_core_requests", HELP["requests"], labels=REQUEST_LABELS)
    errors = CounterMetricFamily("serve_core_errors", HELP["errors"], labels=ERROR_LABELS)
    for (endpoint, backend), counts in sorted(series.items()):
        requests.add_metric([endpoint, backend], counts.requests)
        for kind, number in sorted(counts.errors.items()):
            errors.add_metric([endpoint, backend, kind], number)
    yield requests
    yield errors


def _streams(streams: dict[tuple[str, str], list[float]]) -> Iterator[Metric]:
    families = [
        CounterMetricFamily(f"serve_core_{name}", HELP[name], labels=REQUEST_LABELS) for name in STREAM_FAMILIES
    ]
    for labels, totals in sorted(streams.items()):
        for family, value in zip(families, totals):
            family.add_metric(list(labels), value)
    yield from families


def _latency(series: dict[tuple[str, str], Series], bounds: tuple[float, ...]) -> Metric:
    latency = HistogramMetricFamily("serve_core_request_latency_seconds", HELP["latency"], labels=LATENCY_LABELS)
    width = len(bounds) + 1
    for (endpoint, backend), counts in sorted(series.items()):
        if not any(counts.counts):
            continue  # only refusals (or the front's timeouts): nothing ran
        for index, phase in enumerate(PHASES):
            buckets = _cumulative(counts.counts[index * width : (index + 1) * width], bounds)
            latency.add_metric([endpoint, backend, phase], buckets, counts.sums[index])
    return latency


def _cumulative(counts: Sequence[int], bounds: Sequence[float]) -> list[tuple[str, float]]:
    """Per-bucket counts (the last one past every bound) as Prometheus' cumulative ``le`` buckets."""
    out: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip((*bounds, float("inf")), counts):
        running += count
        out.append((floatToGoString(bound), running))
    return out


def _gauges(loads: dict[str, BackendLoad]) -> Iterator[Metric]:
    queue = GaugeMetricFamily("serve_core_queue_length", HELP["queue_length"], labels=("backend",))
    in_flight = GaugeMetricFamily("serve_core_in_flight", HELP["in_flight"], labels=("backend",))
    replicas = GaugeMetricFamily("serve_core_replicas", HELP["replicas"], labels=("backend", "state"))
    for backend, load in sorted(loads.items()):
        queue.add_metric([backend], load.queued)
        in_flight.add_metric([backend], load.in_flight)
        replicas.add_metric([backend, "desired"], load.desired)
        replicas.add_metric([backend, "running"], load.running)
    yield from (queue, in_flight, replicas)


# ------------------------------------------------------------------- multiprocess
class SharedFamilies:
    """The metric objects of multiprocess mode, whose values live in ``PROMETHEUS_MULTIPROC_DIR``.

    One per instance; run one instance per worker process (two at once in one process
    would write the same entries of the same files).

    Raises:
        ServeStateError: prometheus-client was imported before the variable was set (it
            chooses where values live at import), so values would stay in this process.
    """

    def __init__(self, config: MetricsConfig) -> None:
        if values.ValueClass is values.MutexValue:
            raise ServeStateError(
                f"{MULTIPROC_ENV} is set but prometheus_client was imported before it was: set it in the "
                "environment of the server process (e.g. before gunicorn starts)"
            )
        self.requests = Counter("serve_core_requests", HELP["requests"], REQUEST_LABELS, registry=None)
        self.errors = Counter("serve_core_errors", HELP["errors"], ERROR_LABELS, registry=None)
        self.latency = Histogram(
            "serve_core_request_latency_seconds", HELP["latency"], LATENCY_LABELS,
            buckets=config.latency_buckets, registry=None,
        )
        self.batch_size = Histogram(
            "serve_core_batch_size", HELP["batch_size"], ("backend",), buckets=config.batch_size_buckets, registry=None
        )
        self.streams = [
            Counter(f"serve_core_{name}", HELP[name], REQUEST_LABELS, registry=None) for name in STREAM_FAMILIES
        ]
        # livesum: a scrape adds up the workers alive (each runs its own queues and replicas).
        self.queue_length = Gauge(
            "serve_core_queue_length", HELP["queue_length"], ("backend",), registry=None, multiprocess_mode="livesum"
        )
        self.in_flight = Gauge(
            "serve_core_in_flight", HELP["in_flight"], ("backend",), registry=None, multiprocess_mode="livesum"
        )
        self.replicas = Gauge(
            "serve_core_replicas", HELP["replicas"], ("backend", "state"), registry=None, multiprocess_mode="livesum"
        )
        self._lock = threading.Lock()  # gauges are set from the refresh timer and from scrapes
        self._gauged: set[str] = set()

    def meter(self, backend: str, load: LoadSource | None) -> SharedMeter:
        return SharedMeter(self, backend, load)

    def set_gauges(self, loads: dict[str, BackendLoad]) -> None:
        """Set this worker's gauges; backends it no longer runs drop to zero."""
        zero = BackendLoad(0, 0, 0, 0)
        with self._lock:
            for backend in sorted(self._gauged - loads.keys()):
                self._set(backend, zero)
            for backend, load in loads.items():
                self._set(backend, load)
            self._gauged = set(loads)

    def _set(self, backend: str, load: BackendLoad) -> None:
        self.queue_length.labels(backend).set(load.queued)
        self.in_flight.labels(backend).set(load.in_flight)
        self.replicas.labels(backend, "desired").set(load.desired)
        self.replicas.labels(backend, "running").set(load.running)


class _Children:
    """The metric children of one ``(endpoint, backend)``, resolved once."""

    __slots__ = ("requests", "phases", "errors", "_family", "_labels")

    def __init__(self, families: SharedFamilies, endpoint: str, backend: str) -> None:
        self.requests = families.requests.labels(endpoint, backend)
        self.phases = [families.latency.labels(endpoint, backend, phase) for phase in PHASES]
        self.errors: dict[str, Any] = {}
        self._family, self._labels = families.errors, (endpoint, backend)

    def error(self, kind: str) -> Any:
        child = self.errors.get(kind)
        if child is None:
            child = self.errors[kind] = self._family.labels(*self._labels, kind)
        return child


class SharedMeter:
    """A meter writing through to multiprocess metric objects (same calls as :class:`~serve_core.prom.LocalMeter`)."""

    def __init__(self, families: SharedFamilies, backend: str, load: LoadSource | None) -> None:
        self.backend = backend
        self.load = load
        self._families = families
        self._children: dict[str, _Children] = {}
        self._batch = families.batch_size.labels(backend)

    def _of(self, endpoint: str) -> _Children:
        children = self._children.get(endpoint)
        if children is None:
            children = self._children[endpoint] = _Children(self._families, endpoint, self.backend)
        return children

    def finished(self, queries: Sequence[Query], outcomes: Sequence[Outcome], now: float) -> None:
        self._batch.observe(len(queries))
        execution = now - queries[0].dispatched
        for query, outcome in zip(queries, outcomes):
            children = self._of(query.endpoint)
            children.requests.inc()
            queue, batch_wait, run, total = children.phases
            waited = query.batch_wait
            queue.observe(query.dispatched - query.arrival - waited)
            batch_wait.observe(waited)
            run.observe(execution)
            total.observe(now - query.arrival)
            if not outcome.ok:
                children.error("user_error").inc()

    def answered(self, queries: Iterable[Query], kind: str | None) -> None:
        for query in queries:
            children = self._of(query.endpoint)
            children.requests.inc()
            if kind is not None:
                children.error(kind).inc()

    def error(self, endpoint: str, kind: str) -> None:
        self._of(endpoint).error(kind).inc()

    def streamed(self, query: Query, items: int, seconds: float) -> None:
        streams, produced, duration = self._families.streams
        streams.labels(query.endpoint, self.backend).inc()
        produced.labels(query.endpoint, self.backend).inc(items)
        duration.labels(query.endpoint, self.backend).inc(seconds)


# ------------------------------------------------------------------------ export
class Exporter:
    """The Prometheus exposition of one instance: its registry, a scrape, a WSGI app."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.registry = CollectorRegistry(auto_describe=False)
        if metrics.multiprocess:
            MultiProcessCollector(self.registry)  # reads every worker's files at each scrape
        else:
            self.registry.register(ServeCollector(metrics))

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The body and content type of a scrape (OpenMetrics when ``accept`` asks for it)."""
        self._metrics.refresh()
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def wsgi_app(self) -> Callable[..., Iterable[bytes]]:
        """prometheus-client's WSGI app over this registry (any path; ``?name[]=`` filters)."""
        inner = make_wsgi_app(self.registry)
        refresh = self._metrics.refresh

        def metrics_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            refresh()
            return inner(environ, start_response)

        return metrics_app

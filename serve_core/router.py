"""The router: admission from an endpoint to a backend's runtime.

For each query it asks the endpoint's policy for a backend (using the current traffic
weights, and queue lengths for PowerOfTwo) and hands the query to that backend's
:class:`~serve_core.runtime.BackendRuntime`, which owns it from then on. An endpoint
without traffic parks its queries in the :class:`~serve_core.waiting.WaitingRoom`
until ``set_traffic`` releases them (or their wait ends). The router's lock guards
the endpoints and their policies only; each runtime has its own.
"""

from __future__ import annotations

import random
import threading
from typing import Any

from .clock import Clock
from .errors import BackPressureError, ServeError, ShuttingDownError
from .metrics import Counter, percentile_keys
from .policy import Policy, PolicySpec
from .prom import Meter, Metrics
from .queues import Query
from .recent_errors import RecentErrors
from .runtime import BackendRuntime
from .split import Traffic
from .waiting import WaitingRoom


class _Endpoint:
    __slots__ = ("name", "policy", "requests", "errors")

    def __init__(self, name: str) -> None:
        self.name = name
        self.policy: Policy | None = None
        self.requests = Counter()
        self.errors = Counter()


class Router:
    """Routes the queries of endpoints to backend runtimes."""

    def __init__(
        self,
        *,
        clock: Clock,
        policy: PolicySpec,
        policy_kwargs: dict[str, Any],
        rng: random.Random,
        max_pending_per_endpoint: int,
        pending_timeout_s: float,
        metrics: Metrics | None = None,
        recent_errors: RecentErrors | None = None,
    ) -> None:
        self._clock = clock
        self._recent_errors = recent_errors
        self._policy = policy
        self._policy_kwargs = policy_kwargs
        self._rng = rng
        self._lock = threading.Lock()
        self._runtimes: dict[str, BackendRuntime] = {}
        self._endpoints: dict[str, _Endpoint] = {}
        self._waiting = WaitingRoom(clock, max_pending_per_endpoint, pending_timeout_s, self._expired)
        self._closed = False
        # Queries answered before reaching a backend (backend label ""), counted under self._lock.
        self._meter: Meter | None = metrics.meter("", self._lock, None) if metrics is not None else None

    def add_backend(self, runtime: BackendRuntime) -> None:
        with self._lock:
            self._runtimes[runtime.tag] = runtime

    def set_traffic(self, endpoint: str, weights: dict[str, float]) -> None:
        """Install new weights; queries waiting for traffic are admitted now (or answered with why not)."""
        with self._lock:
            ep = self._endpoint(endpoint)
            ep.policy = self._policy.build(Traffic.of(weights), self._rng, self._policy_kwargs)
        touched: dict[str, BackendRuntime] = {}
        for query in self._waiting.release(endpoint):  # all queued first: then EDF orders them
            try:
                runtime = self._choose(ep, query)
                runtime.admit(query, dispatch=False)
            except ServeError as exc:  # backend full or broken: the query is ours to answer
                query.settle(False, exc)
            else:
                touched[runtime.tag] = runtime
        for runtime in touched.values():
            runtime.dispatch()

    def submit(self, query: Query) -> None:
        """Admit a query: hand it to a backend runtime, or hold it until its endpoint has traffic.

        Raises:
            BackPressureError: the chosen backend queue (or the waiting room) is full.
            ReplicaDiedError: the chosen backend has no replica and could not restart one.
            ShuttingDownError: the instance is shutting down.
        """
        with self._lock:
            if self._closed:
                self._count((query,), "shutdown")
                raise ShuttingDownError("serve instance is shutting down; no new calls")
            ep = self._endpoints.get(query.endpoint) or self._endpoint(query.endpoint)
            ep.requests.value += 1
            if ep.policy is None:
                try:
                    self._waiting.hold(ep.name, query)
                except BackPressureError:
                    self._count((query,), "backpressure")
                    raise
                return
            runtime = self._runtimes[ep.policy.choose(query.shard_key, self._queue_length)]
        runtime.admit(query)

    def _choose(self, ep: _Endpoint, query: Query) -> BackendRuntime:
        with self._lock:
            assert ep.policy is not None  # set by set_traffic before any release; internal invariant
            return self._runtimes[ep.policy.choose(query.shard_key, self._queue_length)]

    def _endpoint(self, name: str) -> _Endpoint:
        ep = self._endpoints.get(name)
        if ep is None:
            ep = self._endpoints[name] = _Endpoint(name)
        return ep

    def _queue_length(self, tag: str) -> int:
        return self._runtimes[tag].queue_length

    def _count(self, queries: tuple[Query, ...] | list[Query], kind: str) -> None:
        """Count queries answered here, before any backend, with error ``kind`` (under the lock)."""
        if self._meter is not None:
            self._meter.answered(queries, kind)

    def _expired(self, endpoint: str, queries: list[Query]) -> None:
        with self._lock:
            self._count(queries, "deadline")
        error = self._waiting.expired_error(endpoint)
        for query in queries:
            query.settle(False, error)

    def count_error(self, endpoint: str, backend: str, error: BaseException) -> None:
        """A query of ``endpoint`` was answered with ``error`` by ``backend`` (called by runtimes)."""
        with self._lock:
            self._endpoint(endpoint).errors.inc()
        if self._recent_errors is not None:
            self._recent_errors.add(endpoint, backend, error)

    def close(self) -> None:
        """Refuse new queries, and answer those waiting for traffic (they have nowhere to go)."""
        with self._lock:
            self._closed = True
        leftovers = self._waiting.close()
        with self._lock:
            self._count(leftovers, "shutdown")
        for query in leftovers:
            query.settle(False, ShuttingDownError("serve instance shut down while the query waited for traffic"))

    def stat(self, percentiles: list[float], windows: list[float]) -> dict[str, float]:
        """The flat ``stat()`` dict: counters read under the locks, percentiles computed outside them."""
        now = self._clock.monotonic()
        with self._lock:
            runtimes = list(self._runtimes.values())
            endpoints = [(ep.name, ep.requests.value, ep.errors.value) for ep in self._endpoints.values()]
        out: dict[str, float] = {}
        snapshots: dict[str, Any] = {}
        for runtime in runtimes:
            stats = runtime.stats()
            tag = runtime.tag
            out[f"{tag}_error_counter"] = stats.errors
            out[f"{tag}_request_counter"] = stats.requests
            out[f"backend_{tag}_queue_size"] = stats.queue_size
            out[f"backend_{tag}_num_replicas"] = stats.replicas
            out[f"backend_{tag}_desired_replicas"] = stats.desired
            out[f"backend_{tag}_health_check_failures"] = stats.health_failures
            if stats.streams:  # a backend that streamed: its streams and their items
                out[f"{tag}_stream_counter"] = stats.streams
                out[f"{tag}_stream_item_counter"] = stats.stream_items
            for name, snapshot in stats.histograms.items():
                snapshots[f"{tag}_{name}"] = snapshot
        for name, requests, errors in endpoints:
            out[f"endpoint_{name}_request_counter"] = requests
            out[f"endpoint_{name}_error_counter"] = errors
            out[f"endpoint_{name}_pending_size"] = self._waiting.size(name)
        for key, snapshot in snapshots.items():
            out.update(percentile_keys(key, snapshot, percentiles, windows, now))
        return out

"""The router: the request lifecycle from enqueue to resolved future.

State (queues, replica slots, policies, metrics) is guarded by one lock, taken once per
state change. Dispatch is event-driven: an enqueue, a completed call, a traffic or
config change each run one dispatch step for the affected backend; there is no
polling thread. Calls are submitted to replicas outside the lock.

Every query's future is resolved exactly once: value, user error, replica death,
expired deadline, overload, or shutdown.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, InvalidStateError
from functools import partial
from typing import Any

from .batching import form_batch
from .clock import Clock
from .config import BackendConfig
from .errors import (
    BackPressureError,
    DeadlineExceededError,
    NotDeliveredError,
    ReplicaDiedError,
    ServeError,
    ServeStateError,
)
from .executors.base import Replica
from .invoke import Call, Outcome
from .metrics import Counter, percentile_keys
from .policy import Policy, PolicySpec
from .queues import Query
from .slots import BackendState, Slot
from .split import Traffic
from .waiting import WaitingRoom

Work = tuple[BackendState, Slot, list[Query]]

MAX_REQUEUES = 3
"""Times a query may come back undelivered (``NotDeliveredError``) before it fails."""


class _EndpointState:
    def __init__(self, name: str) -> None:
        self.name = name
        self.policy: Policy | None = None
        self.requests = Counter()
        self.errors = Counter()


class Router:
    """Routes queries of endpoints to backend queues and replica slots."""

    def __init__(
        self,
        *,
        clock: Clock,
        policy: PolicySpec,
        policy_kwargs: dict[str, Any],
        rng: random.Random,
        gc_window_seconds: float,
        max_pending_per_endpoint: int,
        pending_timeout_s: float,
        on_replica_died: Callable[[str, Replica], None],
    ) -> None:
        self._clock = clock
        self._policy = policy
        self._policy_kwargs = policy_kwargs
        self._rng = rng
        self._gc_window = gc_window_seconds
        self._on_replica_died = on_replica_died
        self._lock = threading.Lock()
        self._backends: dict[str, BackendState] = {}
        self._endpoints: dict[str, _EndpointState] = {}
        self._waiting = WaitingRoom(
            self._lock, clock, max_pending_per_endpoint, pending_timeout_s, self._fail
        )
        self._closed = False

    # ---------------------------------------------------------------- setup
    def add_backend(self, tag: str, config: BackendConfig) -> None:
        with self._lock:
            self._backends[tag] = BackendState(tag, config, self._gc_window)

    def set_config(self, tag: str, config: BackendConfig) -> None:
        with self._lock:
            state = self._backends[tag]
            state.config = config
            state.queue.max_size = config.max_queue_size
            state.set_capacity()
            work, expired = self._dispatch(state)
        self._run(work, expired)

    def add_replica(self, tag: str, replica: Replica) -> None:
        with self._lock:
            state = self._backends[tag]
            state.add(replica)
            work, expired = self._dispatch(state)
        self._run(work, expired)

    def retire_replicas(self, tag: str, count: int, oldest: bool = False) -> list[Slot]:
        """Stop routing to ``count`` replicas (the newest unless ``oldest``).

        Each returned slot's ``drained`` future resolves once its call in flight is done.
        """
        with self._lock:
            return self._backends[tag].retire(count, oldest)

    def mark_broken(self, tag: str, error: BaseException) -> None:
        """The backend lost its last replica and could not restart one.

        Its queued queries fail with ``error``, and so do new ones until a replica is added.
        """
        with self._lock:
            state = self._backends[tag]
            if state.slots:
                return
            state.broken = error
            leftovers = state.queue.drain()
        self._fail(leftovers, error)

    def replica_count(self, tag: str) -> int:
        with self._lock:
            return len(self._backends[tag].slots)

    def replicas(self, tag: str) -> list[Replica]:
        with self._lock:
            return [slot.replica for slot in self._backends[tag].slots]

    def set_traffic(self, endpoint: str, weights: dict[str, float]) -> None:
        """Install new weights; queries waiting for traffic are routed now."""
        with self._lock:
            ep = self._endpoint(endpoint)
            ep.policy = self._policy.build(Traffic.of(weights), self._rng, self._policy_kwargs)
            rejected: list[Query] = []
            touched: dict[str, BackendState] = {}
            for query in self._waiting.release(endpoint):
                try:
                    state = self._route(ep, query)
                except BackPressureError:
                    rejected.append(query)
                else:
                    touched[state.tag] = state
            work: list[Work] = []
            expired: list[Query] = []
            for state in touched.values():
                more, old = self._dispatch(state)
                work += more
                expired += old
        self._fail(rejected, BackPressureError(f"queues of endpoint {endpoint!r} are full"))
        self._run(work, expired)

    # -------------------------------------------------------------- requests
    def submit(self, query: Query) -> None:
        """Admit a query: route it, or hold it until its endpoint has traffic.

        Raises:
            BackPressureError: the chosen backend queue (or the pending queue) is full.
            ServeStateError: the router was closed.
        """
        with self._lock:
            if self._closed:
                raise ServeStateError("serve instance is shut down")
            ep = self._endpoint(query.endpoint)
            ep.requests.inc()
            if ep.policy is None:
                self._waiting.hold(ep.name, query)
                return
            state = self._route(ep, query)
            work, expired = self._dispatch(state)
        self._run(work, expired)

    def _endpoint(self, name: str) -> _EndpointState:
        ep = self._endpoints.get(name)
        if ep is None:
            ep = self._endpoints[name] = _EndpointState(name)
        return ep

    def _route(self, ep: _EndpointState, query: Query) -> BackendState:
        assert ep.policy is not None  # callers check; internal invariant
        tag = ep.policy.choose(query.shard_key, self._queue_len)
        state = self._backends[tag]
        if state.broken is not None:
            raise state.broken
        query.backend = tag
        state.queue.push(query)
        return state

    def _queue_len(self, tag: str) -> int:
        return len(self._backends[tag].queue)

    # -------------------------------------------------------------- dispatch
    def _dispatch(self, state: BackendState) -> tuple[list[Work], list[Query]]:
        """Pair idle slots with batches (under the lock)."""
        idle, queue = state.idle, state.queue
        if not (idle and queue):
            return [], []
        work: list[Work] = []
        expired: list[Query] = []
        config = state.config
        now = self._clock.monotonic()
        if config.max_batch_size is None:
            # Single calls: form_batch with a limit of 1, inlined (the hot path).
            drop_expired = config.drop_expired
            while idle and queue:
                query = queue.pop()
                if drop_expired and query.deadline < now:
                    expired.append(query)
                elif query.started or query.future.set_running_or_notify_cancel():
                    query.dispatched = now
                    call = [query]
                    work.append((state, state.start(call), call))
            return work, expired
        while idle and queue:
            batch = form_batch(queue, config.max_batch_size, now, config.drop_expired)
            expired += batch.expired
            queries = [q for q in batch.queries if q.started or q.future.set_running_or_notify_cancel()]
            for query in queries:
                query.dispatched = now
            if queries:
                work.append((state, state.start(queries), queries))
        return work, expired

    def _run(self, work: list[Work], expired: list[Query]) -> None:
        """Submit work outside the lock.

        A call that is already complete when ``submit`` returns (inline replicas, a
        broken executor) is finished here and the work it frees joins this loop, so
        a chain of such calls iterates instead of recursing.
        """
        if expired:
            self._fail(expired, None)
        while work:
            freed: list[Work] = []
            for state, slot, queries in work:
                freed += self._submit(state, slot, queries)
            work = freed

    def _submit(self, state: BackendState, slot: Slot, queries: list[Query]) -> list[Work]:
        """Hand a call to its replica; returns the work freed if it completed at once."""
        head = queries[0]
        if len(queries) == 1:
            requests: tuple[Any, ...] = (head.request,)
            kwargs: tuple[dict[str, Any], ...] = (head.kwargs,)
        else:
            requests = tuple(q.request for q in queries)
            kwargs = tuple(q.kwargs for q in queries)
        call = Call(
            method=head.method,
            web=head.request is not None,
            batched=state.config.max_batch_size is not None,
            requests=requests,
            kwargs=kwargs,
        )
        if not slot.replica.alive:
            return self._requeue(state, slot, queries)
        try:
            future = slot.replica.submit(call)
        except BaseException as exc:  # noqa: BLE001 - a broken executor is a dead replica
            future = Future()
            future.set_exception(exc)
        if future.done():
            return self._complete(state, slot, queries, future)
        future.add_done_callback(partial(self._on_done, state, slot, queries))
        return []

    def _requeue(self, state: BackendState, slot: Slot, queries: list[Query]) -> list[Work]:
        """The replica died before it got the call: the queries go back, the slot goes."""
        work: list[Work] = []
        expired: list[Query] = []
        failed: list[Query] = []
        with self._lock:
            replace = state.drop(slot, queries)
            # Nothing would run them if the instance closed or the backend broke (both emptied
            # the queue), and a query turned away again and again stops bouncing.
            error = self._cannot_requeue(state)
            for query in queries:
                query.requeues += 1
                if error is None and query.requeues <= MAX_REQUEUES:
                    query.started = True  # its future is already running
                    state.queue.restore(query)
                else:
                    failed.append(query)
            if error is None:
                work, expired = self._dispatch(state)
        if replace:
            self._on_replica_died(state.tag, slot.replica)
        if failed:
            self._fail(failed, error or ReplicaDiedError(
                f"no replica of backend {state.tag!r} took the query after {MAX_REQUEUES} attempts"
            ))
        if expired:
            self._fail(expired, None)
        return work

    def _cannot_requeue(self, state: BackendState) -> BaseException | None:
        if self._closed:
            return ServeStateError("serve instance shut down before the query ran")
        return state.broken

    def _on_done(
        self, state: BackendState, slot: Slot, queries: list[Query], future: Future[list[Outcome]]
    ) -> None:
        self._run(self._complete(state, slot, queries, future), [])

    def _complete(
        self, state: BackendState, slot: Slot, queries: list[Query], future: Future[list[Outcome]]
    ) -> list[Work]:
        """Record a finished call and answer its queries; returns the work this frees."""
        died: BaseException | None = None
        try:
            outcomes = future.result()
        except NotDeliveredError:
            return self._requeue(state, slot, queries)  # nothing ran: another replica takes them
        except BaseException as exc:  # noqa: BLE001 - any failure of the future is a dead replica
            died, outcomes = exc, []
        if died is None and len(outcomes) != len(queries):  # an executor bug must not strand callers
            error = ServeError(
                f"replica {slot.replica.replica_id} answered {len(outcomes)} of {len(queries)} queries"
            )
            outcomes = [Outcome(False, error)] * len(queries)
        now = self._clock.monotonic()
        replace = False
        with self._lock:
            state.requests.inc(len(queries))
            if died is None:
                for query, outcome in zip(queries, outcomes, strict=False):
                    state.latency.record(now - query.arrival, now)
                    state.queue_wait.record(query.dispatched - query.arrival, now)
                    if not outcome.ok:
                        self._count_error(state, query)
                state.execution.record(now - queries[0].dispatched, now)
                state.batch_size.record(len(queries), now)
                state.finish(slot, queries)
            else:
                for query in queries:
                    self._count_error(state, query)
                replace = state.drop(slot, queries)
            work, expired = self._dispatch(state) if not self._closed else ([], [])
        if died is None:
            for query, outcome in zip(queries, outcomes, strict=False):
                _resolve(query.future, outcome)
        else:
            self._fail(queries, _as_replica_death(slot.replica, died))
            if replace:
                self._on_replica_died(state.tag, slot.replica)
        if expired:
            self._fail(expired, None)
        return work

    def _count_error(self, state: BackendState, query: Query) -> None:
        state.errors.inc()
        self._endpoints[query.endpoint].errors.inc()

    def _fail(self, queries: Iterable[Query], error: BaseException | None) -> None:
        """Fail queries; ``error=None`` means their deadline passed."""
        for query in queries:
            exc = error or DeadlineExceededError(
                f"deadline of the query to backend {query.backend!r} passed before it ran"
            )
            future = query.future
            if future.done():
                continue  # cancelled by the caller
            try:
                if future.running() or future.set_running_or_notify_cancel():
                    future.set_exception(exc)
            except InvalidStateError:
                pass  # answered meanwhile by another thread (e.g. shutdown's abandon_in_flight)

    # --------------------------------------------------------------- metrics
    def stat(self, percentiles: list[float], windows: list[float]) -> dict[str, float]:
        now = self._clock.monotonic()
        out: dict[str, float] = {}
        snapshots = {}
        longest = max(windows, default=0)
        with self._lock:  # copy under the lock; the numpy work happens after
            for tag, state in self._backends.items():
                out[f"{tag}_error_counter"] = state.errors.value
                out[f"{tag}_request_counter"] = state.requests.value
                out[f"backend_{tag}_queue_size"] = len(state.queue)
                out[f"backend_{tag}_num_replicas"] = len(state.slots)
                for name, hist in state.histograms.items():
                    snapshots[f"{tag}_{name}"] = hist.snapshot(longest, now)
            for name, ep in self._endpoints.items():
                out[f"endpoint_{name}_request_counter"] = ep.requests.value
                out[f"endpoint_{name}_error_counter"] = ep.errors.value
                out[f"endpoint_{name}_pending_size"] = self._waiting.size(name)
        for key, samples in snapshots.items():
            out.update(percentile_keys(key, samples, percentiles, windows, now))
        return out

    # ------------------------------------------------------------- lifecycle
    def abandon_in_flight(self) -> None:
        """Fail the calls still running (after shutdown gave up waiting for them)."""
        with self._lock:
            running = [query for state in self._backends.values() for query in state.in_flight()]
        self._fail(running, ServeStateError("serve instance shut down before the call finished"))

    def close(self) -> None:
        """Refuse new queries and fail every queued one (in-flight calls still finish)."""
        with self._lock:
            self._closed = True
            leftovers: list[Query] = []
            for state in self._backends.values():
                leftovers += state.queue.drain()
        leftovers += self._waiting.close()
        self._fail(leftovers, ServeStateError("serve instance shut down before the query ran"))


def _resolve(future: Future[Any], outcome: Outcome) -> None:
    try:
        if outcome.ok:
            future.set_result(outcome.value)
        else:
            future.set_exception(outcome.value)
    except InvalidStateError:
        pass  # already failed by shutdown (abandon_in_flight)


def _as_replica_death(replica: Replica, error: BaseException) -> BaseException:
    if isinstance(error, ReplicaDiedError):
        return error
    died = ReplicaDiedError(f"replica {replica.replica_id} failed: {error!r}")
    died.__cause__ = error
    return died

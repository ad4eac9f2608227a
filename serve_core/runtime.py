"""``BackendRuntime``: one backend while it runs.

A runtime owns everything of its backend that changes at run time: the config (held
here only), the deadline-ordered queue, one :class:`Slot` per replica, the metrics,
and the replica lifecycle (start, scale up and down with drain, replace a dead
replica, replace all on a placement change, drain and close on shutdown). Its
:class:`~serve_core.supervision.Supervisor` runs the autoscaling decisions and health checks.

Who owns a query, and so who may answer it: the queue while it is queued, then the
slot's call it was dispatched in (keyed by a token). Whoever takes it out of its
container under the runtime's lock answers it (:meth:`Query.settle`), outside the lock.

Dispatch is event-driven: an admission, a finished call, a timer (deadline, batch wait)
or a config change each take the work that can start under the lock and submit it
outside. A call that is already answered when ``submit`` returns (an inline replica, a
refused call) is finished in the same loop, and the work it frees joins that loop, so a
chain of such calls iterates instead of recursing. Waits are timers on the instance's clock.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import Any

from .batching import ExecutionTimes, form_batch
from .callerruns import RecentLongest, may_run_here
from .clock import Clock, Timer, wait_for
from .composition import Origin, ReplicaScope, check_chain
from .config import BackendConfig
from .errors import (
    BackPressureError,
    DeadlineExceededError,
    LoopBackError,
    NotDeliveredError,
    ReplicaDiedError,
    ServeError,
    ServeTypeError,
    ShuttingDownError,
)
from .executors.base import IN_PROCESS_ATTRIBUTE, SERIAL_ATTRIBUTE, Call, ExecutorPool, Outcome, Replica, ReplicaSpec
from .metrics import Counter, WindowedHistogram
from .prom import BackendLoad, Meter, Metrics, error_kind
from .queues import NO_DEADLINE, BackendQueue, Query, Timing
from .registry import BackendInfo
from .streams import ItemStream
from .supervision import Supervisor, checks_health

log = logging.getLogger("serve_core")

MAX_REQUEUES = 3
"""Times a query may come back undelivered (``NotDeliveredError``) before it fails."""

HISTOGRAMS = ("latency_s", "queue_wait_s", "execution_s", "batch_size", "stream_duration_s")
"""Per-backend windowed histograms: arrival to answer (a stream's end), time queued, time of a call,
batch sizes, and from a stream's first item to its end (in ``stat()`` once the backend streamed)."""

RETRY_AFTER_BOUNDS_S = (1.0, 60.0)
"""Range of the ``retry_after_s`` hint of the ``BackPressureError`` of a full queue."""

SERVICE_WINDOW_S = 10.0
"""Trailing window of call times over which a backend's service rate is estimated for that hint."""


def retry_after_hint(queued: int, in_flight: int, mean_call_s: float) -> float:
    """Seconds until ``queued`` queries have drained at the backend's recent service rate, bounded.

    The rate is Little's law over the replicas: ``in_flight`` queries held by them, each
    taking ``mean_call_s`` from dispatch to answer, complete at ``in_flight / mean_call_s``
    per second. Nothing in flight or no recent call: no rate, the lower bound.
    """
    low, high = RETRY_AFTER_BOUNDS_S
    if in_flight <= 0 or not mean_call_s > 0:
        return low
    return min(high, max(low, queued * mean_call_s / in_flight))


class Slot:
    """A replica and the calls it holds (at most ``capacity`` at once), by token."""

    __slots__ = (
        "replica", "capacity", "calls", "retired", "drained", "timers", "cancel", "run_here", "idle", "in_service",
        "in_process",
    )

    def __init__(self, replica: Replica, capacity: int) -> None:
        self.replica = replica
        self.capacity = capacity
        # The replica's optional ``cancel(future)`` (executors.base.CancellableReplica), or None.
        self.cancel: Callable[[Future[list[Outcome]]], bool] | None = getattr(replica, "cancel", None)
        # The replica's optional ``run_here(call)`` (executors.base.CallerRunsReplica), or None.
        self.run_here: Callable[[Call], list[Outcome]] | None = getattr(replica, "run_here", None)
        # The replica's optional ``in_process`` flag: its calls run on a thread of this process.
        self.in_process: bool = bool(getattr(replica, IN_PROCESS_ATTRIBUTE, False))
        self.calls: dict[int, list[Query]] = {}
        self.timers: dict[int, Timer] = {}  # token -> its call_timeout_s timer, when one is set
        self.retired = False  # taken out of service: finishes its calls, gets no new ones
        # Where the runtime keeps it (flags, so the hot path tests membership in O(1)):
        self.idle = False  # in the runtime's idle deque
        self.in_service = False  # in the runtime's slots (not retired, not dropped)
        self.drained: Future[None] = Future()  # resolves once retired (or dropped) with no call left

    @property
    def full(self) -> bool:
        return len(self.calls) >= self.capacity

    def mark_drained(self) -> None:
        if not self.drained.done():
            self.drained.set_result(None)


@dataclasses.dataclass(frozen=True)
class RuntimeStats:
    """What ``stat()`` reads of a backend, taken in O(1) per histogram under its lock."""

    requests: int
    errors: int
    queue_size: int
    replicas: int
    histograms: dict[str, Any]  # name -> the histogram's snapshot
    desired: int = 0  # replicas the runtime keeps (num_replicas, or the autoscaler's choice)
    health_failures: int = 0  # replicas taken out of rotation by a failed health check
    streams: int = 0  # streams ended
    stream_items: int = 0  # items they produced


def capacity(config: BackendConfig, replica: Replica) -> int:
    """Calls ``replica`` may hold: the config's ``max_concurrent_queries``, else its executor's default."""
    if config.max_concurrent_queries is not None:
        return config.max_concurrent_queries
    return replica.default_max_concurrent_queries


Work = tuple[Slot, int, list[Query]]
Done = tuple[Slot, int, "Future[list[Outcome]]"]  # a call that ended: its slot, token and future


class BackendRuntime:
    """The running state and lifecycle of one backend.

    Args:
        definition: the backend's code and init arguments.
        config: its config (this object keeps the only live copy).
        executors: where replicas are built.
        clock: time source and timers.
        gc_window_seconds: how much metric history to keep.
        drain_timeout_s: how long a retired replica may take to finish its calls.
        count_error: called with the endpoint, this backend's tag and the error of each query
            answered with an error.
        metrics: where the Prometheus metrics are recorded (None: not recorded).
        scope: what its replicas' code is part of (calls made there are composed calls).
    """

    def __init__(
        self,
        definition: BackendInfo,
        config: BackendConfig,
        *,
        executors: ExecutorPool,
        clock: Clock,
        gc_window_seconds: float,
        drain_timeout_s: float,
        count_error: Callable[[str, str, BaseException], None],
        metrics: Metrics | None = None,
        scope: ReplicaScope | None = None,
    ) -> None:
        self.tag = definition.tag
        self._scope = scope
        self.definition = definition
        self._config = config.copy()
        self._executors = executors
        self._clock = clock
        self._drain_timeout = drain_timeout_s
        self._count_error = count_error
        self._lock = threading.Lock()  # the state below; never held while calling out
        self._lifecycle = threading.RLock()  # serialises start, scale, reconfigure, replace, close
        self._queue = BackendQueue(config.max_queue_size)
        self._slots: list[Slot] = []  # in service, oldest first
        self._idle: collections.deque[Slot] = collections.deque()  # in service with room; the next one first
        self._active: set[Slot] = set()  # holding calls (in service, retired or dropped)
        self._tokens = itertools.count()
        self._replica_ids = itertools.count(1)
        self._broken: str | None = None  # why it has no replica, when restarting one failed
        self._admitting = True
        self._closed = False
        self._alarm: Timer | None = None  # wakes a dispatch at a deadline or when a waiting batch is due
        self._idle_waiters: list[Callable[[], None]] = []
        self._replacers: list[threading.Thread] = []
        self._local = threading.local()  # per thread: the dispatch loop it is running, if any
        self._times = ExecutionTimes()
        self._longest = RecentLongest()  # for callers with a timeout: may they run a call (callerruns)?
        self._filling_since: float | None = None  # when a free replica began holding a batch open to fill
        self._target = config.initial_replicas  # replicas to keep: num_replicas, or the autoscaler's
        self._supervisor = Supervisor(self, clock, checks_health(definition.target))
        self._hinted: set[tuple[str, str]] = set()
        self.requests = Counter()
        self.errors = Counter()
        self.streams = Counter()
        self.stream_items = Counter()
        self._streams: dict[int, ItemStream] = {}  # token -> the stream its call is producing
        self.histograms = {name: WindowedHistogram(gc_window_seconds) for name in HISTOGRAMS}
        self._latency, self._queue_wait, self._execution, self._batch_size, self._stream_duration = (
            self.histograms[name] for name in HISTOGRAMS
        )
        # Recorded under self._lock, like the histograms above.
        self._meter: Meter | None = metrics.meter(self.tag, self._lock, self.load) if metrics is not None else None

    # ------------------------------------------------------------------ reading
    @property
    def config(self) -> BackendConfig:
        """The live config (do not mutate: :meth:`reconfigure` changes it)."""
        return self._config

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    def replicas(self) -> list[Replica]:
        """The replicas in service, oldest first."""
        with self._lock:
            return [slot.replica for slot in self._slots]

    in_service = replicas

    @property
    def target_replicas(self) -> int:
        """The replica count kept: ``num_replicas``, or what the autoscaler chose last."""
        return self._target

    def ongoing(self) -> int:
        """Queries queued or held by replicas (the autoscaler's load)."""
        with self._lock:
            return len(self._queue) + sum(len(call) for slot in self._active for call in slot.calls.values())

    def stats(self) -> RuntimeStats:
        now = self._clock.monotonic()
        with self._lock:
            return RuntimeStats(
                self.requests.value,
                self.errors.value,
                len(self._queue),
                len(self._slots),
                {
                    name: hist.snapshot(now) for name, hist in self.histograms.items()
                    if hist is not self._stream_duration or self.streams.value
                },
                self._target,
                self._supervisor.health_failures,
                self.streams.value,
                self.stream_items.value,
            )

    def load(self) -> BackendLoad | None:
        """The gauges of the Prometheus export (None once closed): queued, in flight, replicas."""
        with self._lock:
            if self._closed:
                return None
            in_flight = sum(len(queries) for slot in self._active for queries in slot.calls.values())
            desired = self._target if self._admitting else 0  # num_replicas, or the autoscaler's count
            return BackendLoad(len(self._queue), in_flight, desired, len(self._slots))

    # ---------------------------------------------------------------- admission
    def admit(self, query: Query, *, dispatch: bool = True) -> None:
        """Queue a query and dispatch what can run (with ``dispatch=False``, the caller calls :meth:`dispatch`).

        Raises:
            BackPressureError: the queue is full.
            ReplicaDiedError: the backend has no replica and could not restart one.
            ShuttingDownError: the instance is shutting down.
        """
        with self._lock:
            if not self._admitting:
                self._refused(query, "shutdown")
                raise ShuttingDownError(f"backend {self.tag!r} is shutting down; no new calls")
            if self._broken is not None:
                self._refused(query, "replica_died")
                raise ReplicaDiedError(self._broken)
            if query.chain and self.tag in query.chain:
                self._check_loop(query)
            query.backend = self.tag
            try:
                self._queue.push(query)
            except BackPressureError as full:
                full.retry_after_s = self._retry_after()
                self._refused(query, "backpressure")
                raise
            if not (dispatch and self._idle):
                if self._config.drop_expired and query.deadline != NO_DEADLINE:
                    self._wake_at(self._queue.earliest_deadline())
                return
            here = query.caller_runs and may_run_here(query.caller_timeout_s, self._longest, self._clock.monotonic())
            work, expired = self._take()
        self._run(work, expired, here=query if here else None)

    def _check_loop(self, query: Query) -> None:
        """Refuse a composed call that only the calls of its own chain could serve (under the lock)."""
        config = self._config
        most = config.autoscaling.max_replicas if config.autoscaling is not None else self._target
        most = max(most, len(self._slots))
        per_replica = min(  # calls one replica runs at once: a serial one runs one, whatever it holds
            (1 if getattr(slot.replica, SERIAL_ATTRIBUTE, False) else slot.capacity for slot in self._slots),
            default=config.max_concurrent_queries or 1,
        )
        try:
            check_chain(self.tag, query.chain, most, per_replica)
        except LoopBackError:
            self._refused(query, "loop_back")
            raise

    def _refused(self, query: Query, kind: str) -> None:
        """Count a query refused at admission (under the lock)."""
        if self._meter is not None:
            self._meter.answered((query,), kind)

    def _retry_after(self) -> float:
        """The ``retry_after_s`` hint of a full queue (under the lock; O(calls in the window))."""
        calls = self._execution.window(SERVICE_WINDOW_S, self._clock.monotonic())
        in_flight = sum(len(queries) for slot in self._active for queries in slot.calls.values())
        return retry_after_hint(len(self._queue), in_flight, float(calls.mean()) if calls.size else 0.0)

    # ------------------------------------------------------------------ dispatch
    def dispatch(self) -> None:
        """Run what can run now (after admissions with ``dispatch=False``, a timer, a new replica)."""
        with self._lock:
            work, expired = self._take()
            waiters = self._idle_now()
        for waiter in waiters:
            waiter()
        self._run(work, expired)

    def _take(self) -> tuple[list[Work], list[Query]]:
        """Pair slots with room with batches, split out expired queries, arm timers (under the lock)."""
        config = self._config
        now = self._clock.monotonic()
        expired = self._queue.pop_expired(now) if config.drop_expired else []
        work: list[Work] = []
        idle, queue = self._idle, self._queue
        wait_s = config.batch_wait_timeout_s if self._admitting else 0.0  # a drain waits for nothing
        while idle and queue:
            batch = form_batch(queue, config.max_batch_size, now, config.drop_expired, wait_s, self._times.estimate)
            expired += batch.expired
            if batch.wait_until is not None:
                if self._filling_since is None:
                    self._filling_since = now
                self._wake_at(batch.wait_until)
                break
            queries = batch.queries
            if len(queries) == 1:
                if not queries[0].claim():
                    self._dropped(queries)  # cancelled by its caller: dropped
                    continue
            else:
                claimed = [query for query in queries if query.claim()]
                if len(claimed) < len(queries):
                    self._dropped([query for query in queries if not query.started])
                queries = claimed
                if not queries:
                    continue
            slot = idle.popleft()
            token = next(self._tokens)
            calls = slot.calls
            calls[token] = queries
            self._active.add(slot)
            if len(calls) < slot.capacity:
                idle.append(slot)
            else:
                slot.idle = False
            filling, self._filling_since = self._filling_since, None
            for query in queries:
                query.dispatched = now
                if filling is not None:  # the batch waited to fill: since then, or since the query came
                    query.batch_wait = now - max(filling, query.arrival)
            if config.call_timeout_s is not None:
                slot.timers[token] = self._clock.call_later(
                    config.call_timeout_s, partial(self._call_timed_out, slot, token, config.call_timeout_s)
                )
            work.append((slot, token, queries))
        if not queue:
            self._filling_since = None
        if config.drop_expired and queue:
            self._wake_at(self._queue.earliest_deadline())
        if expired and self._meter is not None:
            self._meter.answered(expired, "deadline")
        return work, expired

    def _dropped(self, queries: list[Query]) -> None:
        """Count queries their callers cancelled while queued (under the lock): requests, no error."""
        if self._meter is not None:
            self._meter.answered(queries, None)

    def _run(
        self, work: list[Work], expired: list[Query], done: Done | None = None, here: Query | None = None
    ) -> None:
        """Finish ``done``, answer expired queries and submit work, outside the lock.

        Calls answered at once loop here. A thread already inside this loop for this backend
        (a user's done-callback calling the endpoint again, an inline backend calling itself)
        only adds to it: the work joins the outer loop instead of nesting, so no chain of
        calls grows the stack. ``here`` is the query this thread's caller blocks on
        (``Query.caller_runs``): dispatched alone to a replica that can run it in this
        thread (:meth:`_runs_here`), it runs here.
        """
        local = self._local
        pending = getattr(local, "pending", None)
        if pending is not None:
            pending.append(self._finish(*done) if done is not None else (work, expired))
            return
        local.pending = pending = [(work, expired)]
        try:
            if done is not None:
                pending.append(self._finish(*done))
            while pending:
                work, expired = pending.pop()
                for query in expired:
                    _answer(query, False, DeadlineExceededError(
                        f"deadline of the query to backend {self.tag!r} passed before it ran"
                    ))
                for slot, token, queries in work:
                    if queries[0] is here and self._runs_here(slot, queries):
                        # The user's code runs outside this loop: a call it makes to this backend
                        # must be submitted by a loop of its own, not wait for this one to resume.
                        local.pending = None
                        try:
                            outcomes, died = _run_here(slot, self._call(queries))
                        finally:
                            local.pending = pending
                        pending.append(self._finish_outcomes(slot, token, outcomes, died))
                        continue
                    future = self._submit(slot, self._call(queries))
                    if future.done():
                        pending.append(self._finish(slot, token, future))
                    else:
                        if slot.cancel is not None and len(queries) == 1:  # ServeFuture.cancel reaches the call
                            queries[0].future.set_canceller(partial(slot.cancel, future))
                        future.add_done_callback(partial(self._on_done, slot, token))
        finally:
            local.pending = None

    def _runs_here(self, slot: Slot, queries: list[Query]) -> bool:
        """Caller-runs: a single call, on a replica that can run it here and holds no other call.

        Not with ``call_timeout_s`` (a call in the caller's thread could not be abandoned) nor
        ``caller_runs=False`` (the backend wants its calls on the replica's thread); a caller
        with a timeout only if the backend's recent calls were short (:mod:`.callerruns`,
        decided in :meth:`admit`).
        """
        config = self._config
        return (
            slot.run_here is not None
            and len(queries) == 1
            and slot.capacity == 1
            and config.caller_runs
            and config.call_timeout_s is None
        )

    def _call(self, queries: list[Query]) -> Call:
        head = queries[0]
        if len(queries) == 1:
            requests: tuple[Any, ...] = (head.request,)
            kwargs: tuple[dict[str, Any], ...] = (head.kwargs,)
        else:
            requests = tuple([query.request for query in queries])
            kwargs = tuple([query.kwargs for query in queries])
        batched = self._config.max_batch_size is not None
        web = head.request is not None
        call = Call(head.method, web, batched, requests, kwargs, not batched and (web or head.stream))
        if head.chain or head.deadline != NO_DEADLINE or len(queries) > 1:
            call.origin = _origin(queries)
        return call

    def _submit(self, slot: Slot, call: Call) -> Future[list[Outcome]]:
        try:
            if slot.replica.alive:
                return slot.replica.submit(call)
            error: BaseException = NotDeliveredError(f"replica {slot.replica.replica_id} is not running")
        except BaseException as exc:  # noqa: BLE001 - a broken executor is a dead replica
            error = exc
        future: Future[list[Outcome]] = Future()
        future.set_exception(error)
        return future

    def _on_done(self, slot: Slot, token: int, future: Future[list[Outcome]]) -> None:
        """A call ended on the executor's thread: finish it and run the work it frees.

        Inside a dispatch loop of this thread (a call refused the moment it was submitted), the
        finish joins that loop; otherwise it runs here, and any call a user's callback makes
        while it answers starts a loop of its own, at most one level deeper.
        """
        if getattr(self._local, "pending", None) is not None:
            self._run([], [], (slot, token, future))
            return
        work, expired = self._finish(slot, token, future)
        if work or expired:
            self._run(work, expired)

    def _finish(self, slot: Slot, token: int, future: Future[list[Outcome]]) -> tuple[list[Work], list[Query]]:
        """Answer a finished call's queries and free its slot; returns the work that can start now."""
        died: BaseException | None = None
        try:
            outcomes = future.result()
        except BaseException as exc:  # noqa: BLE001 - any failure of the future is a dead replica
            outcomes, died = [], exc
        return self._finish_outcomes(slot, token, outcomes, died)

    def _finish_outcomes(
        self, slot: Slot, token: int, outcomes: list[Outcome], died: BaseException | None
    ) -> tuple[list[Work], list[Query]]:
        """:meth:`_finish` for a call that answered ``outcomes``, or failed with ``died``."""
        if died is None and len(outcomes) == 1 and isinstance(outcomes[0].value, ItemStream):
            self._stream_started(slot, token, outcomes[0].value)
            return [], []
        now = self._clock.monotonic()
        replace = False
        failed: list[Query] = []
        error: BaseException | None = None
        with self._lock:
            queries = slot.calls.pop(token, None)
            timer = slot.timers.pop(token, None) if slot.timers else None
            if timer is not None:
                timer.cancel()
            if queries is None:
                return [], []  # abandoned by shutdown or by its call timeout, which answered its queries
            if not slot.calls:
                self._active.discard(slot)
            if isinstance(died, NotDeliveredError):
                replace, failed, error = self._requeue(slot, queries)
                outcomes = []
            elif died is not None:
                replace = self._drop(slot)
                failed, error, outcomes = queries, _as_replica_death(slot.replica, died), []
                self.requests.inc(len(queries))
                self.errors.inc(len(queries))
                self._stamp(slot, queries, now)
                if self._meter is not None:
                    self._meter.answered(queries, "replica_died")
            else:
                outcomes = _checked(slot, queries, outcomes)
                self._record(slot, queries, outcomes, now)
            if self._idle and self._queue:
                work, expired = self._take()
            else:
                work, expired = [], []
                if self._config.drop_expired and self._queue:
                    # Requeued queries wait for a replica: their deadlines still count.
                    self._wake_at(self._queue.earliest_deadline())
            waiters = self._idle_now() if self._idle_waiters else []
        for query, outcome in zip(queries, outcomes):
            if not outcome.ok:
                self._count_error(query.endpoint, self.tag, outcome.value)
            _answer(query, outcome.ok, outcome.value)
        if failed and error is not None:
            for query in failed:
                self._count_error(query.endpoint, self.tag, error)
                _answer(query, False, error)
        if replace:
            self._replace_later(slot.replica)
        for waiter in waiters:
            waiter()
        return work, expired

    # ------------------------------------------------------------------- streams
    def _stream_started(self, slot: Slot, token: int, stream: ItemStream) -> None:
        """A call's first item exists: answer its query with the stream; the slot stays taken until it ends.

        The call's timeout (like the query's deadline) applied until now, to the first item.
        """
        with self._lock:
            queries = slot.calls.get(token)
            timer = slot.timers.pop(token, None) if slot.timers else None
            if timer is not None:
                timer.cancel()
            if queries is not None:
                self._streams[token] = stream
                if queries[0].request is not None:
                    self._stamp(slot, queries, self._clock.monotonic())
        if queries is None:  # abandoned by shutdown or its call timeout, which answered the query
            stream.close()
            return
        future = queries[0].future
        _answer(queries[0], True, stream)
        if not future.done() or future.cancelled() or future.exception() is not None or future.result() is not stream:
            stream.close()  # the answer did not take (a future resolved by someone else): nobody reads it
        stream.ended.add_done_callback(partial(self._stream_ended, slot, token, stream))

    def _stream_ended(self, slot: Slot, token: int, stream: ItemStream, ended: Future[None]) -> None:
        """The producer of a stream is done: count it and free its slot (its query was answered)."""
        died = ended.exception()
        error = stream.error
        now = self._clock.monotonic()
        replace = False
        with self._lock:
            self._streams.pop(token, None)
            queries = slot.calls.pop(token, None)
            if queries is None:
                return  # abandoned by shutdown or a call timeout on its replica
            if not slot.calls:
                self._active.discard(slot)
            if died is not None:
                replace = self._drop(slot)
            self.streams.inc()
            self.stream_items.inc(stream.items)
            self._stream_duration.record(now - queries[0].dispatched, now)
            self._record(slot, queries, [Outcome(error is None, error)], now)
            if self._meter is not None:
                self._meter.streamed(queries[0], stream.items, now - queries[0].dispatched)
            work, expired = self._take() if self._idle and self._queue else ([], [])
            waiters = self._idle_now() if self._idle_waiters else []
        if error is not None:
            self._count_error(queries[0].endpoint, self.tag, error)
        if replace:
            self._replace_later(slot.replica)
        for waiter in waiters:
            waiter()
        if work or expired:
            self._run(work, expired)

    def _take_streams(self, tokens: Any) -> list[ItemStream]:
        """Take the streams of these calls' tokens away from them (under the lock); the caller aborts them."""
        return [stream for token in list(tokens) if (stream := self._streams.pop(token, None)) is not None]

    def _record(self, slot: Slot, queries: list[Query], outcomes: list[Outcome], now: float) -> None:
        """Metrics of a finished call, and its slot freed (under the lock)."""
        self.requests.inc(len(queries))
        if len(queries) == 1:
            query = queries[0]
            self._latency.record(now - query.arrival, now)
            self._queue_wait.record(query.dispatched - query.arrival, now)
            if not outcomes[0].ok:
                self.errors.inc()
        else:  # a batch: its queries were dispatched together
            dispatched = queries[0].dispatched
            self._latency.record_many([now - query.arrival for query in queries], now)
            self._queue_wait.record_many([dispatched - query.arrival for query in queries], now)
            failed = sum(not outcome.ok for outcome in outcomes)
            if failed:
                self.errors.inc(failed)
        seconds = now - queries[0].dispatched
        self._execution.record(seconds, now)
        self._batch_size.record(len(queries), now)
        if self._meter is not None:
            self._meter.finished(queries, outcomes, now)
        if queries[0].request is not None:  # web calls: the HTTP front reads it (one batch is all web or none)
            self._stamp(slot, queries, now)
        self._longest.observe(seconds, now)
        if self._config.batch_wait_timeout_s:  # the model only serves batches that wait
            self._times.observe(len(queries), seconds)
        if slot.retired:
            if not slot.calls:
                slot.mark_drained()
        elif not slot.full and not slot.idle and slot.in_service:
            # Not "was full": after max_concurrent_queries was lowered a slot can stay full
            # through several finished calls, and must enter the idle list once.
            if slot.in_process and not slot.calls:  # next in line: its thread has just run and holds nothing
                self._idle.appendleft(slot)
            else:  # in turn: calls spread over the replicas
                self._idle.append(slot)
            slot.idle = True

    def _stamp(self, slot: Slot, queries: list[Query], now: float) -> None:
        """Attach each query's :class:`Timing` to its future, before it is answered (under the lock)."""
        replica, execution = slot.replica.replica_id, now - queries[0].dispatched
        for query in queries:
            waited = query.batch_wait
            query.future.timing = Timing(
                self.tag, replica, query.dispatched - query.arrival - waited, waited, execution
            )

    def _call_timed_out(self, slot: Slot, token: int, seconds: float) -> None:
        """A call ran past ``call_timeout_s`` (a timer): fail it, requeue what waited on that replica, replace it."""
        with self._lock:
            queries = slot.calls.pop(token, None)
            slot.timers.pop(token, None)
            if queries is None:
                return  # it finished meanwhile
            streaming = [token for token in slot.calls if token in self._streams]
            streams = self._take_streams(streaming)  # answered already: aborted below, not requeued
            # Handed to it, not started:
            behind = [query for token, call in slot.calls.items() if token not in streaming for query in call]
            slot.calls.clear()
            for timer in slot.timers.values():
                timer.cancel()
            slot.timers.clear()
            self._active.discard(slot)
            replace, failed, error = self._requeue(slot, behind) if behind else (self._drop(slot), [], None)
            self.requests.inc(len(queries))
            self.errors.inc(len(queries))
            self._stamp(slot, queries, self._clock.monotonic())
            timeout = DeadlineExceededError(
                f"the call to backend {self.tag!r} ran longer than its call_timeout_s={seconds:g}; its replica "
                f"{slot.replica.replica_id} is replaced"
            )
            if self._meter is not None:
                self._meter.answered(queries, "deadline")
            work, expired = self._take() if self._idle and self._queue else ([], [])
        log.warning(
            "backend %r: a call on replica %s ran past call_timeout_s=%g; replacing the replica (a process "
            "or Ray replica is killed; a thread cannot be: a thread or inline replica's call is abandoned, "
            "still running)", self.tag, slot.replica.replica_id, seconds,
        )
        for query in queries:
            self._count_error(query.endpoint, self.tag, timeout)
            _answer(query, False, timeout)
        for stream in streams:
            stream.abort(ReplicaDiedError(f"replica {slot.replica.replica_id} is replaced: a call on it timed out"))
        if failed and error is not None:  # failed queries come with their error
            for query in failed:
                self._count_error(query.endpoint, self.tag, error)
                _answer(query, False, error)
        if replace:
            self._replace_later(slot.replica)
        self._run(work, expired)

    def _requeue(self, slot: Slot, queries: list[Query]) -> tuple[bool, list[Query], BaseException | None]:
        """The replica never got the call: the queries go back in the queue, the slot goes (under the lock)."""
        replace = self._drop(slot)
        error: BaseException | None = None
        if self._closed:
            error = ShuttingDownError("serve instance shut down before the query ran")
        elif self._broken is not None:
            error = ReplicaDiedError(self._broken)
        failed = []
        for query in queries:
            query.requeues += 1
            if error is None and query.requeues <= MAX_REQUEUES:
                self._queue.restore(query)
            else:
                failed.append(query)
        if failed and error is None:
            error = ReplicaDiedError(
                f"no replica of backend {self.tag!r} took the query after {MAX_REQUEUES} attempts"
            )
        if failed:
            self.requests.inc(len(failed))
            self.errors.inc(len(failed))
            if self._meter is not None and error is not None:
                self._meter.answered(failed, error_kind(error))
        return replace, failed, error

    def _drop(self, slot: Slot) -> bool:
        """Take a slot whose replica died out of service; True the first time (replace it then)."""
        if not slot.calls:
            slot.mark_drained()
        if slot.idle:
            self._idle.remove(slot)
            slot.idle = False
        if slot.in_service:
            slot.in_service = False
            self._slots.remove(slot)
            return True
        return False

    # -------------------------------------------------------------------- timers
    def _wake_at(self, when: float) -> None:
        """Dispatch again at ``when``, unless a wake-up is armed for then or sooner (under the lock).

        One timer serves both waits, the earliest queued deadline (``drop_expired``) and a
        batch waiting to fill: the dispatch it runs re-arms whatever is still ahead.
        """
        alarm = self._alarm
        if when == NO_DEADLINE or (alarm is not None and alarm.when <= when):
            return
        if alarm is not None:
            alarm.cancel()
        self._alarm = self._clock.call_at(when, self._on_alarm)

    def _on_alarm(self) -> None:
        with self._lock:
            alarm = self._alarm
            if alarm is not None and alarm.when <= self._clock.monotonic():
                self._alarm = None
        self.dispatch()

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start ``num_replicas`` replicas (autoscaling: ``min_replicas``); returns when they are
        ready (raises if one fails), then starts the supervisor's timers."""
        with self._lifecycle:
            for replica in self._start_replicas(self._target):
                self._add(replica)
        self._supervisor.start()

    def reconfigure(self, config: BackendConfig) -> None:
        """Apply a config live: queue bound, batching, concurrency, placement, replica count.

        A placement change replaces the replicas one by one (the new one is ready before
        an old one drains). If a replica fails to start, the old config comes back (the
        replicas already replaced stay) and the error is raised.
        """
        with self._lifecycle:
            old, old_target = self._config, self._target
            self._apply(config)
            self._target = _target_for(config, old_target)
            try:
                if config.placement() != old.placement():
                    self._replace_all()
                self._scale(self._target)
            except BaseException:
                self._apply(old)
                self._target = old_target
                try:
                    self._scale(old_target)
                except Exception:  # noqa: BLE001 - the first error is the one to raise
                    log.exception("backend %r: could not scale back to %d replicas", self.tag, old_target)
                raise
        self._supervisor.reconfigure(config)

    def resize_later(self, count: int) -> None:
        """Scale to ``count`` replicas (the autoscaler's decision), from a helper thread."""
        self._in_helper(f"serve-scale-{self.tag}", self._resize, count)

    def _resize(self, count: int) -> None:
        with self._lifecycle:
            if self._closed or self._config.autoscaling is None:
                return
            self._target = count
            try:
                self._scale(count)
            except Exception:  # noqa: BLE001 - the next decision tries again
                log.exception("backend %r: autoscaling to %d replicas failed", self.tag, count)

    def evict_later(self, replica: Replica, reason: str) -> None:
        """Take an unhealthy replica out of rotation, drain and replace it, from a helper thread."""
        self._in_helper(f"serve-evict-{replica.replica_id}", self._evict, replica)

    def _evict(self, replica: Replica) -> None:
        with self._lifecycle:
            with self._lock:
                slot = next((s for s in self._slots if s.replica is replica), None)
            if slot is None or self._closed:
                return  # already gone (died, retired, shut down)
            if len(self._slots) <= self._target:  # the replacement first: no gap in service
                try:
                    (fresh,) = self._start_replicas(1)
                    self._add(fresh)
                except Exception:  # noqa: BLE001 - the unhealthy one goes anyway
                    log.exception("backend %r: could not start a replacement for %s", self.tag, replica.replica_id)
            self._retire_slots([slot])

    def _in_helper(self, name: str, work: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=work, args=args, name=name, daemon=True)
        with self._lock:  # started under the lock: close() never joins a thread not started yet
            if self._closed:
                return
            self._replacers = [t for t in self._replacers if t.is_alive()] + [thread]
            thread.start()

    def _apply(self, config: BackendConfig) -> None:
        with self._lock:
            self._config = config = config.copy()
            self._queue.max_size = config.max_queue_size
            for slot in self._slots:
                slot.capacity = capacity(config, slot.replica)
            self._idle = collections.deque(slot for slot in self._slots if not slot.full)
            for slot in self._slots:
                slot.idle = not slot.full
        self.dispatch()

    def _scale(self, target: int) -> None:
        current = len(self._slots)
        if target > current:
            for replica in self._start_replicas(target - current):
                self._add(replica)
        elif target < current:
            self._retire(current - target, oldest=False)

    def _replace_all(self) -> None:
        for _ in range(len(self._slots)):
            (replica,) = self._start_replicas(1)
            self._add(replica)
            self._retire(1, oldest=True)

    def _start_replicas(self, count: int) -> list[Replica]:
        """Start ``count`` replicas with the live config; on a failure, stop those started and re-raise."""
        config = self._config
        executor = self._executors.get(config.executor)
        self._warn_unused_hints(executor.name, executor.places_replicas, config)
        started: list[Replica] = []
        try:
            for _ in range(count):
                spec = ReplicaSpec(
                    self.tag, f"{self.tag}#{next(self._replica_ids)}",
                    self.definition.target, self.definition.init_args, config, self._scope,
                )
                replica = executor.start_replica(spec)
                started.append(replica)
                if not isinstance(replica, Replica):
                    raise ServeTypeError(
                        f"executor {executor.name!r} returned {type(replica).__name__}, which lacks members of the "
                        "Replica protocol (replica_id, default_max_concurrent_queries, alive, submit, stop)"
                    )
        except BaseException:
            for replica in started:
                replica.stop(0)
            raise
        return started

    def _warn_unused_hints(self, executor: str, places_replicas: bool, config: BackendConfig) -> None:
        """Placement hints (``num_gpus``...) mean nothing to an executor that does not place replicas."""
        if places_replicas:
            return
        hints = {k: v for k, v in config.placement().items() if k != "executor" and v is not None}
        key = (executor, repr(sorted(hints.items())))
        if hints and key not in self._hinted:
            self._hinted.add(key)
            log.warning(
                "backend %r: %s only place replicas on the ray executor; the %r executor ignores them",
                self.tag, ", ".join(f"{k}={v!r}" for k, v in hints.items()), executor,
            )

    def _add(self, replica: Replica) -> None:
        with self._lock:
            if self._closed:
                stop = True
            else:
                stop = False
                slot = Slot(replica, capacity(self._config, replica))
                self._slots.append(slot)
                self._idle.append(slot)
                slot.idle = slot.in_service = True
                self._broken = None
        if stop:
            replica.stop(0)
        else:
            self.dispatch()

    def _retire(self, count: int, oldest: bool) -> None:
        """Take ``count`` replicas out of service (the newest unless ``oldest``), drain, stop them."""
        with self._lock:
            cut = slice(0, count) if oldest else slice(len(self._slots) - count, None)
            retired = self._slots[cut]
        self._retire_slots(retired)

    def _retire_slots(self, retired: list[Slot]) -> None:
        """Take these slots out of service, let them finish their calls (one drain time), stop them."""
        with self._lock:
            retired = [slot for slot in retired if slot in self._slots]
            self._slots = [slot for slot in self._slots if slot not in retired]
            for slot in retired:
                slot.retired = True
                slot.in_service = False
                if slot.idle:
                    self._idle.remove(slot)
                    slot.idle = False
                if not slot.calls:
                    slot.mark_drained()
        deadline = self._clock.monotonic() + self._drain_timeout  # one drain time for all of them
        for slot in retired:
            left = max(0.0, deadline - self._clock.monotonic())
            if not wait_for(self._clock, slot.drained, left):
                log.warning("replica %s did not drain in time; stopping it", slot.replica.replica_id)
            slot.replica.stop(left)

    def _replace_later(self, dead: Replica) -> None:
        """Replace a replica that died, from a helper thread (never on the caller's)."""
        self._in_helper(f"serve-replace-{dead.replica_id}", self._replace, dead)

    def _replace(self, dead: Replica) -> None:
        try:
            dead.stop(0)
        except Exception:  # noqa: BLE001 - it is already dead; cleanup is best effort
            log.debug("stopping dead replica %s failed", dead.replica_id, exc_info=True)
        with self._lifecycle:
            if self._closed or len(self._slots) >= self._target:
                return
            try:
                (replica,) = self._start_replicas(1)
            except Exception as exc:  # noqa: BLE001
                log.exception("could not replace dead replica %s of %s", dead.replica_id, self.tag)
                self._mark_broken(
                    f"backend {self.tag!r} has no replica left: restarting one failed with {exc!r}; "
                    "fix the cause, then set_backend_config() starts replicas again"
                )
                return
            log.warning("replaced dead replica %s of %s with %s", dead.replica_id, self.tag, replica.replica_id)
            self._add(replica)

    def _mark_broken(self, reason: str) -> None:
        """No replica left and none could start: queued and new queries fail with ``reason``."""
        with self._lock:
            if self._slots:
                return
            self._broken = reason
            leftovers = self._queue.drain()
            waiters = self._idle_now()
            if leftovers and self._meter is not None:
                self._meter.answered(leftovers, "replica_died")
        for query in leftovers:
            _answer(query, False, ReplicaDiedError(reason))
        for waiter in waiters:
            waiter()

    # ------------------------------------------------------------------ shutdown
    def stop_admitting(self) -> None:
        """Refuse new queries; what is queued and in flight goes on (batches no longer wait to fill)."""
        with self._lock:
            self._admitting = False
        self.dispatch()

    def when_idle(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once nothing is queued nor in flight (now, if so already)."""
        with self._lock:
            self._idle_waiters.append(callback)
            waiters = self._idle_now()
        for waiter in waiters:
            waiter()

    def _idle_now(self) -> list[Callable[[], None]]:
        """The idle waiters to call, if the runtime is idle (under the lock)."""
        if self._queue or self._active or not self._idle_waiters:
            return []
        waiters, self._idle_waiters = self._idle_waiters, []
        return waiters

    def close(self, stop_timeout: float) -> None:
        """Fail what is still queued or in flight with ``ShuttingDownError`` and stop the replicas."""
        # Not under _lifecycle: a replacement still starting (which may take long) must not hold up
        # the shutdown; it finds the runtime closed when it is done and stops its replica.
        self._supervisor.stop()
        with self._lock:
            self._admitting, self._closed = False, True
            leftovers = self._queue.drain()
            slots, self._slots = self._slots, []
            self._idle.clear()
            for slot in slots:
                slot.idle = slot.in_service = False
            if self._alarm is not None:
                self._alarm.cancel()
            replacers = self._replacers
            if leftovers and self._meter is not None:
                self._meter.answered(leftovers, "shutdown")
            streams, self._streams = self._streams, {}
        for query in leftovers:
            _answer(query, False, ShuttingDownError("serve instance shut down before the query ran"))
        for stream in streams.values():  # answered already: their readers get the error mid-stream
            stream.abort(ShuttingDownError("serve instance shut down while the stream ran"))
        for slot in slots:
            slot.replica.stop(stop_timeout)
        for thread in replacers:
            thread.join(stop_timeout)
        with self._lock:  # calls that outlived the drain: shutdown answers them, their replies are dropped
            abandoned = [
                query for slot in self._active for token, call in slot.calls.items() if token not in streams
                for query in call
            ]
            for slot in self._active:
                slot.calls.clear()
            self._active.clear()
            if abandoned and self._meter is not None:
                self._meter.answered(abandoned, "shutdown")
        for query in abandoned:
            _answer(query, False, ShuttingDownError("serve instance shut down before the call finished"))


def _target_for(config: BackendConfig, current: int) -> int:
    """The replica count to keep under ``config``: ``num_replicas``, or ``current`` within the autoscaling bounds."""
    autoscaling = config.autoscaling
    if autoscaling is None:
        return config.num_replicas
    return max(autoscaling.min_replicas, min(autoscaling.max_replicas, current))


def _answer(query: Query, ok: bool, value: Any) -> None:
    """Settle a query; a failure here (a future the user resolved himself) must not strand the others."""
    try:
        query.settle(ok, value)
    except Exception:  # noqa: BLE001 - logged: the other queries of the call still get their answers
        log.exception("could not answer a query of endpoint %r", query.endpoint)


def _run_here(slot: Slot, call: Call) -> tuple[list[Outcome], BaseException | None]:
    """Run a call in this thread on the slot's replica: its outcomes, or why the replica failed."""
    assert slot.run_here is not None  # checked by _runs_here; internal invariant
    try:
        return slot.run_here(call), None
    except BaseException as exc:  # noqa: BLE001 - as from a future: NotDeliveredError requeues, else died
        return [], exc


def _checked(slot: Slot, queries: list[Query], outcomes: list[Outcome]) -> list[Outcome]:
    """Outcomes that match the queries one to one (an executor bug must not strand callers)."""
    if len(outcomes) == len(queries):
        return outcomes
    error = ServeError(f"replica {slot.replica.replica_id} answered {len(outcomes)} of {len(queries)} queries")
    return [Outcome(False, error)] * len(queries)


def _as_replica_death(replica: Replica, error: BaseException) -> BaseException:
    if isinstance(error, ReplicaDiedError):
        return error
    died = ReplicaDiedError(f"replica {replica.replica_id} failed: {error!r}")
    died.__cause__ = error
    return died



def _origin(queries: list[Query]) -> Origin | None:
    """What calls made inside the call of ``queries`` inherit: the latest deadline (a batch serves
    them all), and the longest chain (each entry of it is a slot held upstream)."""
    deadline = max(query.deadline for query in queries)
    chain = max((query.chain for query in queries), key=len)
    if not chain and deadline == NO_DEADLINE:
        return None
    return Origin(deadline, chain)

"""Queries and the per-backend queue, ordered by deadline then arrival.

A :class:`Query` has one owner at a time (the waiting room, a backend queue, or the
replica call it is part of); the owner takes it out of its container under its lock
before it answers it, and :meth:`Query.settle` is the only code that resolves a
query's future. So a future is resolved once, or the second attempt raises.

Cancelling a :class:`ServeFuture` withdraws a queued query (the stdlib's cancel: its owner
drops it); a running one it can only *ask* to stop, through the canceller its runtime
registered when the call reached a replica that can cancel it. The replica then ends the
call, which its owner answers as usual, with ``CancelledError``: the exactly-once rule holds.

The queue is a bounded binary heap keyed by ``(deadline, sequence)``: earliest
deadline first, and equal deadlines (including "no deadline", which is +inf) keep
arrival order.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

from .errors import BackPressureError

NO_DEADLINE = math.inf


@dataclasses.dataclass(slots=True)
class Timing:
    """Where and how long a query spent, attached to its future by the runtime before it is answered.

    ``queue_s`` is the time queued until a replica was free for it, ``batch_wait_s`` the time
    a free replica then held its batch open to fill (``batch_wait_timeout_s``; 0 otherwise),
    ``execution_s`` the time of the replica call it was part of. Set for web queries that
    reached a replica (the HTTP front's ``Server-Timing`` header and access log read it).
    Treat it as immutable: it is not frozen because one is built per web query, and a frozen
    dataclass's ``__init__`` costs three times more.
    """

    backend: str
    replica: str
    queue_s: float
    batch_wait_s: float
    execution_s: float


class ServeFuture(Future):
    """A ``concurrent.futures.Future`` that can also be awaited from asyncio, from any loop.

    ``timing`` is the query's :class:`Timing` once it is answered, when the runtime recorded one.

    :meth:`cancel` also reaches a running call (an ``async def`` backend's task); cancelling
    the asyncio task that awaits this future cancels it the same way.
    """

    timing: Timing | None = None
    # Class-level defaults: a future that is never cancelled costs nothing per instance.
    _canceller: Callable[[], bool] | None = None
    _cancel_wanted = False

    def __await__(self) -> Any:
        import asyncio

        return asyncio.wrap_future(self).__await__()

    def cancel(self) -> bool:
        """Withdraw the query if it is queued; ask its replica to cancel it if it is running.

        Returns:
            True if the query was withdrawn (it resolves cancelled, as a stdlib future), or if the
            running call's replica took the request: an async call's task is cancelled and the
            future resolves with :class:`concurrent.futures.CancelledError` (or with the call's
            answer, if it finished first or swallowed the cancellation, as with
            ``asyncio.Task.cancel``). False when the future is done, or its call cannot be
            cancelled (synchronous code, a batch, an executor without cancellation), or it was
            being handed to its replica at that instant: then the request is kept and reaches the
            call as soon as it is there.
        """
        if super().cancel():
            return True
        if self.done():
            return False
        self._cancel_wanted = True
        canceller = self._canceller
        return canceller() if canceller is not None else False

    def set_canceller(self, canceller: Callable[[], bool]) -> None:
        """Register how to cancel the running call (the runtime, once its replica holds it).

        A :meth:`cancel` that came while the call was on its way is delivered now. Either side
        may see the other's write (both are plain attribute writes under the GIL), so the
        canceller may run twice: replicas' cancels are idempotent.
        """
        self._canceller = canceller
        if self._cancel_wanted and not self.done():
            canceller()


@dataclasses.dataclass(eq=False, slots=True)
class Query:
    """One request on its way to a backend."""

    endpoint: str
    method: str
    kwargs: dict[str, Any]
    request: Any  # the web request, or None for Python calls
    deadline: float  # monotonic seconds; NO_DEADLINE when none was given
    shard_key: str | None
    future: ServeFuture
    arrival: float
    backend: str = ""
    seq: int = 0  # arrival order within the backend queue, set on push
    started: bool = False  # future set running: the caller can no longer cancel it
    requeues: int = 0  # times it came back from a replica it never reached
    dispatched: float = 0.0  # monotonic time it was handed to a replica
    chain: tuple[str, ...] = ()  # made inside replicas of these backends, waiting for it (composition.Origin)
    batch_wait: float = 0.0  # of its time queued, seconds a free replica held its batch open to fill
    stream: bool = False  # the caller reads a stream (handle.options(stream=True)); web calls always may

    @property
    def web(self) -> bool:
        return self.request is not None

    def claim(self) -> bool:
        """Set the future running before the query runs or is answered; False if the caller cancelled it."""
        if self.started:
            return True
        self.started = self.future.set_running_or_notify_cancel()
        return self.started

    def settle(self, ok: bool, value: Any) -> None:
        """Answer the query (the only place that resolves its future): a result, or an exception.

        A query the caller cancelled while it was queued is dropped silently.
        """
        if not (self.started or self.claim()):
            return
        if ok:
            self.future.set_result(value)
        else:
            self.future.set_exception(value)

    def batch_key(self) -> Hashable:
        """Queries that may share one batch call have equal keys."""
        return (self.method, self.web, tuple(self.kwargs))


class BackendQueue:
    """A bounded earliest-deadline-first queue of queries for one backend."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._heap: list[tuple[float, int, Query]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, query: Query) -> None:
        """Add a query; raises :class:`BackPressureError` when the queue is full."""
        if len(self._heap) >= self.max_size:
            raise BackPressureError(
                f"queue of backend {query.backend!r} is full ({self.max_size} queries); retry later"
            )
        query.seq = next(self._seq)
        heapq.heappush(self._heap, (query.deadline, query.seq, query))

    def restore(self, query: Query) -> None:
        """Put back a query taken from this queue, at its original place."""
        heapq.heappush(self._heap, (query.deadline, query.seq, query))

    def pop(self) -> Query:
        return heapq.heappop(self._heap)[2]

    def earliest_deadline(self) -> float:
        """The deadline of the head of the queue (``NO_DEADLINE`` when empty)."""
        return self._heap[0][0] if self._heap else NO_DEADLINE

    def pop_expired(self, now: float) -> list[Query]:
        """Remove and return the queries whose deadline is at or before ``now`` (the head of the heap)."""
        expired = []
        while self._heap and self._heap[0][0] <= now:
            expired.append(heapq.heappop(self._heap)[2])
        return expired

    def drain(self) -> list[Query]:
        """Remove and return every query, in order."""
        return [heapq.heappop(self._heap)[2] for _ in range(len(self._heap))]

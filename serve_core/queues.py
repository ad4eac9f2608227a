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

import bisect
import collections
import dataclasses
import heapq
import itertools
import math
from collections.abc import Hashable
from typing import Any

from .errors import BackPressureError
from .future import ServeFuture, Timing

NO_DEADLINE = math.inf


__all__ = ["NO_DEADLINE", "BackendQueue", "Query", "ServeFuture", "Timing"]


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
    caller_runs: bool = False  # its caller blocks on the answer at once: it may run the call itself
    caller_timeout_s: float | None = None  # ... for that long (None: as long as it takes)

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
    """A bounded earliest-deadline-first queue of queries for one backend.

    Queries with a deadline are in a heap keyed by ``(deadline, seq)``; those without one
    (the common case, and all of them last in EDF order) in a FIFO deque, in arrival order:
    O(1) to push and pop instead of a heap's O(log n) tuple comparisons.
    """

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._heap: list[tuple[float, int, Query]] = []
        self._fifo: collections.deque[Query] = collections.deque()  # no deadline, by seq
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap) + len(self._fifo)

    def push(self, query: Query) -> None:
        """Add a query; raises :class:`BackPressureError` when the queue is full."""
        if len(self._heap) + len(self._fifo) >= self.max_size:
            raise BackPressureError(
                f"queue of backend {query.backend!r} is full ({self.max_size} queries); retry later"
            )
        query.seq = next(self._seq)
        if query.deadline == NO_DEADLINE:
            self._fifo.append(query)
        else:
            heapq.heappush(self._heap, (query.deadline, query.seq, query))

    def restore(self, query: Query) -> None:
        """Put back a query taken from this queue, at its original place."""
        if query.deadline != NO_DEADLINE:
            heapq.heappush(self._heap, (query.deadline, query.seq, query))
            return
        fifo = self._fifo
        if not fifo or query.seq < fifo[0].seq:  # the usual case: it was taken from the front
            fifo.appendleft(query)
            return
        index = bisect.bisect_left(fifo, query.seq, key=_seq)
        fifo.insert(index, query)

    def pop(self) -> Query:
        if self._heap:
            return heapq.heappop(self._heap)[2]
        return self._fifo.popleft()

    def earliest_deadline(self) -> float:
        """The deadline of the head of the queue (``NO_DEADLINE`` when empty or none has one)."""
        return self._heap[0][0] if self._heap else NO_DEADLINE

    def pop_expired(self, now: float) -> list[Query]:
        """Remove and return the queries whose deadline is at or before ``now`` (the head of the heap)."""
        expired = []
        while self._heap and self._heap[0][0] <= now:
            expired.append(heapq.heappop(self._heap)[2])
        return expired

    def drain(self) -> list[Query]:
        """Remove and return every query, in order."""
        ordered = [heapq.heappop(self._heap)[2] for _ in range(len(self._heap))]
        ordered += self._fifo
        self._fifo.clear()
        return ordered


def _seq(query: Query) -> int:
    return query.seq

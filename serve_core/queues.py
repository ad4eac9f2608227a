"""Queries and the per-backend queue, ordered by deadline then arrival.

The queue is a bounded binary heap keyed by ``(deadline, sequence)``: earliest
deadline first, and equal deadlines (including "no deadline", which is +inf) keep
arrival order.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from collections.abc import Hashable
from concurrent.futures import Future
from typing import Any

from .errors import BackPressureError

NO_DEADLINE = math.inf


class ServeFuture(Future):
    """A ``concurrent.futures.Future`` that can also be awaited from asyncio."""

    def __await__(self) -> Any:
        import asyncio

        return asyncio.wrap_future(self).__await__()


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
    started: bool = False  # future already set running (a query put back after a replica died)
    requeues: int = 0  # times it came back from a replica it never reached
    dispatched: float = 0.0  # monotonic time it was handed to a replica

    @property
    def web(self) -> bool:
        return self.request is not None

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

    def drain(self) -> list[Query]:
        """Remove and return every query, in order."""
        return [heapq.heappop(self._heap)[2] for _ in range(len(self._heap))]

"""Batch formation: one pure function over a backend queue, and the execution-time model it uses.

A free replica takes the queries queued right now, up to ``max_batch_size``, in deadline
order (the original's rule). With ``batch_wait_timeout_s`` a batch that is not full
waits to fill: it leaves when it is full, when its oldest query has waited that long,
or earlier when waiting longer would make its tightest deadline miss, judged by the
time the backend took for batches of that size (:class:`ExecutionTimes`). Queries that
cannot share a call with the head of the queue (another method, web vs Python, other
keyword names) stay queued for the next batch. Expired queries are split out when the
backend drops them. Single calls go through the same function with a limit of 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .queues import BackendQueue, Query

EstimateTime = Callable[[int], float]


@dataclasses.dataclass(slots=True)
class Batch:
    """Queries to run together, queries that expired, and when to look again if none may leave.

    ``wait_until`` is set (and ``queries`` empty, everything left queued) when the batch
    is waiting to fill: form it again at that monotonic time, or when a query arrives.
    """

    queries: list[Query]
    expired: list[Query]
    wait_until: float | None = None


def _no_time(size: int) -> float:
    return 0.0


def form_batch(
    queue: BackendQueue,
    max_batch_size: int | None,
    now: float,
    drop_expired: bool,
    wait_s: float = 0.0,
    execution_time: EstimateTime = _no_time,
) -> Batch:
    """Take the next batch from ``queue`` (possibly empty if everything expired or it waits).

    Args:
        queue: the backend queue; taken queries are removed from it.
        max_batch_size: ``None`` for single calls, else the largest batch.
        now: the current monotonic time, to test deadlines.
        drop_expired: split out queries whose deadline is at or before ``now``.
        wait_s: how long a batch that is not full may wait for its oldest query's sake.
        execution_time: expected seconds to run a batch of a given size.
    """
    if max_batch_size is None:  # single calls: the head of the queue, unless it expired
        expired: list[Query] = []
        while queue:
            query = queue.pop()
            if not (drop_expired and query.deadline <= now):
                return Batch([query], expired)
            expired.append(query)
        return Batch([], expired)
    batch = Batch([], [])
    held_back: list[Query] = []
    key = None
    while queue and len(batch.queries) < max_batch_size:
        query = queue.pop()
        if drop_expired and query.deadline <= now:
            batch.expired.append(query)
        elif key is None or query.batch_key() == key:
            key = query.batch_key()
            batch.queries.append(query)
        else:
            held_back.append(query)
    if batch.queries and len(batch.queries) < max_batch_size and wait_s > 0:
        leave_at = _leave_at(batch.queries, wait_s, execution_time)
        if leave_at > now:
            held_back += batch.queries
            batch.queries, batch.wait_until = [], leave_at
    for query in held_back:
        queue.restore(query)
    return batch


DEADLINE_LEAD_S = 0.001
"""A batch leaving for its tightest deadline leaves this much before it: a query whose
deadline has come counts as expired, and a timer may fire a little late."""


def _leave_at(queries: list[Query], wait_s: float, execution_time: EstimateTime) -> float:
    """When a batch that is not full must leave: its wait is over, or its tightest deadline nears."""
    oldest = min(query.arrival for query in queries)
    tightest = min(query.deadline for query in queries)
    return min(oldest + wait_s, tightest - execution_time(len(queries)) - DEADLINE_LEAD_S)


class ExecutionTimes:
    """How long the backend takes per batch size: a moving average per power-of-two bucket.

    Sizes 1, 2-3, 4-7, 8-15... share a bucket. A size whose bucket has no observation yet
    borrows the nearest smaller observed bucket, and counts as instant before any
    observation at all (the batch then leaves by its tightest deadline at the latest).
    """

    SMOOTHING = 0.25  # weight of a new observation

    def __init__(self) -> None:
        self._seconds: dict[int, float] = {}

    def observe(self, size: int, seconds: float) -> None:
        bucket = size.bit_length()
        old = self._seconds.get(bucket)
        self._seconds[bucket] = seconds if old is None else old + self.SMOOTHING * (seconds - old)

    def estimate(self, size: int) -> float:
        for bucket in range(size.bit_length(), 0, -1):
            seconds = self._seconds.get(bucket)
            if seconds is not None:
                return seconds
        return 0.0

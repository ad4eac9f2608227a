"""Batch formation: one pure function over a backend queue.

The rule is the original's: a free replica takes what is queued right now, up to
``max_batch_size``, in deadline order. Queries that cannot share a call with the
head of the queue (another method, web vs Python, other keyword names) stay queued
for the next batch. Expired queries are split out when the backend drops them.
"""

from __future__ import annotations

import dataclasses

from .queues import BackendQueue, Query


@dataclasses.dataclass(slots=True)
class Batch:
    """Queries to run together, and queries that expired while waiting."""

    queries: list[Query]
    expired: list[Query]


def form_batch(
    queue: BackendQueue, max_batch_size: int | None, now: float, drop_expired: bool
) -> Batch:
    """Take the next batch from ``queue`` (possibly empty if everything expired).

    Args:
        queue: the backend queue; taken queries are removed from it.
        max_batch_size: ``None`` for single calls, else the largest batch.
        now: the current monotonic time, to test deadlines.
        drop_expired: split out queries whose deadline is before ``now``.
    """
    limit = max_batch_size or 1
    batch = Batch([], [])
    held_back: list[Query] = []
    key = None
    while queue and len(batch.queries) < limit:
        query = queue.pop()
        if drop_expired and query.deadline < now:
            batch.expired.append(query)
        elif key is None or query.batch_key() == key:
            key = query.batch_key()
            batch.queries.append(query)
        else:
            held_back.append(query)
    for query in held_back:
        queue.restore(query)
    return batch

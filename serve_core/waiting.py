"""The waiting room: queries for endpoints that have no traffic yet.

A ``missing_ok`` handle, or a call to an endpoint not linked yet, parks its query here
until ``link``/``split`` gives the endpoint traffic. The wait is bounded twice: at most
``max_per_endpoint`` queries per endpoint (then ``BackPressureError``), and each query
waits until its own deadline or ``timeout_s`` after its arrival, whichever is first
(then ``DeadlineExceededError``). Expiry is one timer on the clock per endpoint that
has waiting queries, never one per query.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from .clock import Clock, Timer
from .errors import BackPressureError, DeadlineExceededError
from .queues import Query

Expired = Callable[[str, list[Query]], None]


class WaitingRoom:
    """Per-endpoint FIFO queues of queries waiting for traffic.

    Args:
        clock: time source and timers.
        max_per_endpoint: queries one endpoint may hold.
        timeout_s: the longest a query waits.
        on_expired: called with an endpoint and the queries whose wait ended (which it
            owns from then on: it answers them), outside the room's lock.
    """

    def __init__(self, clock: Clock, max_per_endpoint: int, timeout_s: float, on_expired: Expired) -> None:
        self._clock = clock
        self._max = max_per_endpoint
        self.timeout_s = timeout_s
        self._on_expired = on_expired
        self._lock = threading.Lock()
        self._queues: dict[str, collections.deque[Query]] = {}
        self._timers: dict[str, Timer] = {}

    def hold(self, endpoint: str, query: Query) -> None:
        """Park a query; raises ``BackPressureError`` when the endpoint is full."""
        expiry = self._expiry(query)
        with self._lock:
            queue = self._queues.setdefault(endpoint, collections.deque())
            if len(queue) >= self._max:
                raise BackPressureError(
                    f"endpoint {endpoint!r} has no traffic yet and {self._max} queries are "
                    "already waiting; link a backend or retry later"
                )
            queue.append(query)
            timer = self._timers.get(endpoint)
            if timer is None or expiry < timer.when:
                self._arm(endpoint, expiry)

    def release(self, endpoint: str) -> list[Query]:
        """Take every query waiting for ``endpoint``, oldest first (the caller owns them)."""
        with self._lock:
            queue = self._queues.pop(endpoint, None)
            timer = self._timers.pop(endpoint, None)
        if timer is not None:
            timer.cancel()
        return list(queue) if queue else []

    def size(self, endpoint: str) -> int:
        return len(self._queues.get(endpoint, ()))

    def close(self) -> list[Query]:
        """Stop the timers and take every waiting query (the caller owns them)."""
        with self._lock:
            leftovers = [query for queue in self._queues.values() for query in queue]
            self._queues.clear()
            timers = list(self._timers.values())
            self._timers.clear()
        for timer in timers:
            timer.cancel()
        return leftovers

    def expired_error(self, endpoint: str) -> DeadlineExceededError:
        return DeadlineExceededError(
            f"endpoint {endpoint!r} got no traffic within {self.timeout_s} s, or the query's deadline "
            "passed first; link or split it to a backend"
        )

    def _expiry(self, query: Query) -> float:
        return min(query.arrival + self.timeout_s, query.deadline)

    def _arm(self, endpoint: str, when: float) -> None:
        """(Re-)arm the endpoint's timer for ``when`` (under the lock)."""
        old = self._timers.get(endpoint)
        if old is not None:
            old.cancel()
        box: list[Timer] = []  # filled before the lock is released, read by the callback under it
        box.append(self._clock.call_at(when, lambda: self._expire(endpoint, box)))
        self._timers[endpoint] = box[0]

    def _expire(self, endpoint: str, box: list[Timer]) -> None:
        now = self._clock.monotonic()
        with self._lock:
            if not box or self._timers.get(endpoint) is not box[0]:
                return  # released or re-armed meanwhile
            del self._timers[endpoint]
            queue = self._queues.get(endpoint, collections.deque())
            expired = [q for q in queue if self._expiry(q) <= now]
            if expired:
                queue = collections.deque(q for q in queue if self._expiry(q) > now)
                self._queues[endpoint] = queue
            if queue:
                self._arm(endpoint, min(map(self._expiry, queue)))
            else:
                self._queues.pop(endpoint, None)
        if expired:
            self._on_expired(endpoint, expired)

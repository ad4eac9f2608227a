"""The waiting room: queries for endpoints that have no traffic yet.

A ``missing_ok`` handle, or a call to an endpoint not linked yet, parks its query here
until ``link``/``split`` gives the endpoint traffic. The wait is bounded twice: at most
``max_per_endpoint`` queries per endpoint (then ``BackPressureError``), and at most
``timeout_s`` seconds per query (then ``DeadlineExceededError``, from one timer thread per
endpoint that has waiting queries, never one per query).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from .clock import Clock
from .errors import BackPressureError, DeadlineExceededError
from .queues import Query

Fail = Callable[[list[Query], BaseException], None]


class WaitingRoom:
    """Per-endpoint FIFO queues of queries waiting for traffic.

    Args:
        lock: the owner's lock; ``hold``/``release``/``size`` are called under it, the
            timers take it themselves.
        fail: answers expired queries (called outside the lock).
    """

    def __init__(
        self, lock: threading.Lock, clock: Clock, max_per_endpoint: int, timeout_s: float, fail: Fail
    ) -> None:
        self._lock = lock
        self._clock = clock
        self._max = max_per_endpoint
        self._timeout = timeout_s
        self._fail = fail
        self._queues: dict[str, collections.deque[Query]] = {}
        self._timers: dict[str, _Timer] = {}
        self._closed = False

    def hold(self, endpoint: str, query: Query) -> None:
        """Park a query (under the lock); raises ``BackPressureError`` when the endpoint is full."""
        queue = self._queues.setdefault(endpoint, collections.deque())
        if len(queue) >= self._max:
            raise BackPressureError(
                f"endpoint {endpoint!r} has no traffic yet and {self._max} queries are "
                "already waiting; link a backend or retry later"
            )
        queue.append(query)
        timer = self._timers.get(endpoint)
        if timer is None:
            self._arm(endpoint, self._expiry(query) - query.arrival)
        elif self._expiry(query) < timer.fires_at:
            timer.cancel()
            self._arm(endpoint, self._expiry(query) - query.arrival)

    def release(self, endpoint: str) -> list[Query]:
        """Take every query waiting for ``endpoint``, oldest first (under the lock)."""
        queue = self._queues.pop(endpoint, None)
        timer = self._timers.pop(endpoint, None)
        if timer is not None:
            timer.cancel()  # its thread ends at once; nothing is left to expire
        return list(queue) if queue else []

    def size(self, endpoint: str) -> int:
        return len(self._queues.get(endpoint, ()))

    def close(self) -> list[Query]:
        """Stop the timers and return every waiting query (call without the lock held)."""
        with self._lock:
            self._closed = True
            leftovers = [query for queue in self._queues.values() for query in queue]
            self._queues.clear()
            timers = list(self._timers.values())
            self._timers.clear()
        for timer in timers:
            timer.cancel()
            timer.join()
        return leftovers

    def _arm(self, endpoint: str, delay: float) -> None:
        timer = _Timer(max(delay, 0.0), self._expire, (endpoint,))
        timer.fires_at = self._clock.monotonic() + delay
        timer.name = f"serve-waiting-{endpoint}"
        timer.daemon = True
        self._timers[endpoint] = timer
        timer.start()


    def _expiry(self, query: Query) -> float:
        """When a waiting query gives up: its own deadline, or ``timeout_s`` after arrival."""
        return min(query.arrival + self._timeout, query.deadline)

    def _expire(self, endpoint: str) -> None:
        now = self._clock.monotonic()
        expired: list[Query] = []
        with self._lock:
            if self._timers.get(endpoint) is not threading.current_thread():
                return  # released (or re-armed) meanwhile
            del self._timers[endpoint]
            queue = self._queues.get(endpoint, collections.deque())
            expired = [q for q in queue if self._expiry(q) <= now]
            if expired:
                queue = self._queues[endpoint] = collections.deque(q for q in queue if self._expiry(q) > now)
            if queue and not self._closed:
                self._arm(endpoint, min(map(self._expiry, queue)) - now)
        if expired:
            error = DeadlineExceededError(
                f"endpoint {endpoint!r} got no traffic within {self._timeout} s; link or split it to a backend"
            )
            self._fail(expired, error)


class _Timer(threading.Timer):
    fires_at: float = 0.0  # monotonic time (owner's clock) it is due

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
        self._timers: dict[str, threading.Timer] = {}
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
        if endpoint not in self._timers:
            self._arm(endpoint, self._timeout)

    def release(self, endpoint: str) -> list[Query]:
        """Take every query waiting for ``endpoint``, oldest first (under the lock)."""
        queue = self._queues.pop(endpoint, None)
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
        timer = threading.Timer(max(delay, 0.0), self._expire, (endpoint,))
        timer.name = f"serve-waiting-{endpoint}"
        timer.daemon = True
        self._timers[endpoint] = timer
        timer.start()

    def _expire(self, endpoint: str) -> None:
        now = self._clock.monotonic()
        expired: list[Query] = []
        with self._lock:
            self._timers.pop(endpoint, None)
            queue = self._queues.get(endpoint)
            while queue and queue[0].arrival + self._timeout <= now:
                expired.append(queue.popleft())
            if queue and not self._closed:
                self._arm(endpoint, queue[0].arrival + self._timeout - now)
        if expired:
            error = DeadlineExceededError(
                f"endpoint {endpoint!r} got no traffic within {self._timeout} s; link or split it to a backend"
            )
            self._fail(expired, error)

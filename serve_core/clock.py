"""Injectable time: a monotonic clock with a timer service, wall time at the API edge.

Everything in ``serve_core`` that waits — a queued query's deadline, a batch waiting to
fill, a query waiting for its endpoint to get traffic, the shutdown drain — is a timer
armed with :meth:`Clock.call_at` on the instance's clock. :class:`SystemClock` fires
them from one thread; :class:`serve_core.testing.FakeClock` fires them when a test
advances it, so tests drive every wait without sleeping.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

log = logging.getLogger("serve_core")

Callback = Callable[[], object]


class Timer:
    """A callback due at a monotonic time; :meth:`cancel` stops it from firing."""

    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callback) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Clock(Protocol):
    """The time source of a ``Serve`` instance."""

    def monotonic(self) -> float: ...

    def wall(self) -> float:
        """Seconds since the Unix epoch."""
        ...

    def call_at(self, when: float, callback: Callback) -> Timer:
        """Run ``callback()`` once ``monotonic() >= when``, never inside this call.

        Callers arm timers while holding their own locks, which the callback takes: it must
        run later, on the clock's thread (or, for a fake clock, inside ``advance``).
        """
        ...

    def call_later(self, delay: float, callback: Callback) -> Timer:
        """Run ``callback()`` ``delay`` seconds from now."""
        ...


class TimerHeap:
    """Timers in due order, guarded by one lock; the shared part of both clocks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()

    def push(self, timer: Timer) -> bool:
        """Add a timer (under ``lock``); True when it is now the earliest."""
        heapq.heappush(self._heap, (timer.when, next(self._seq), timer))
        return self._heap[0][2] is timer

    def next_due(self) -> float | None:
        """When the earliest live timer is due (under ``lock``), dropping cancelled ones."""
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> Timer | None:
        """The earliest live timer due by ``now``, removed (under ``lock``)."""
        due = self.next_due()
        if due is None or due > now:
            return None
        return heapq.heappop(self._heap)[2]

    def clear(self) -> None:
        self._heap.clear()

    def __len__(self) -> int:
        return sum(1 for _, _, timer in self._heap if not timer.cancelled)


def fire(timer: Timer) -> None:
    """Run a timer's callback; an exception is logged, never lost in the clock's thread."""
    if timer.cancelled:
        return
    try:
        timer.callback()
    except Exception:  # noqa: BLE001 - one failing callback must not stop the others
        log.exception("timer callback %r failed", timer.callback)


class SystemClock:
    """The real clocks; timers fire on one daemon thread, started on first use."""

    monotonic = staticmethod(time.monotonic)
    wall = staticmethod(time.time)

    def __init__(self) -> None:
        self._timers = TimerHeap()
        self._wake = threading.Condition(self._timers.lock)
        self._thread: threading.Thread | None = None
        self._closed = False

    def call_later(self, delay: float, callback: Callback) -> Timer:
        return self.call_at(time.monotonic() + delay, callback)

    def call_at(self, when: float, callback: Callback) -> Timer:
        timer = Timer(when, callback)
        with self._wake:
            if self._closed:
                timer.cancel()
                return timer
            if self._timers.push(timer):
                self._wake.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="serve-clock", daemon=True)
                self._thread.start()
        return timer

    def close(self) -> None:
        """Drop the timers not fired yet and end the timer thread (``Serve`` closes the clock it made)."""
        with self._wake:
            self._closed = True
            self._timers.clear()
            self._wake.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                while True:
                    if self._closed:
                        return
                    due = self._timers.next_due()
                    now = time.monotonic()
                    if due is not None and due <= now:
                        timer = self._timers.pop_due(now)
                        break
                    self._wake.wait(None if due is None else min(due - now, threading.TIMEOUT_MAX))
            if timer is not None:
                fire(timer)


def wait_for(clock: Clock, future: Future[Any], seconds: float | None) -> bool:
    """Wait until ``future`` is done, or ``seconds`` have passed on ``clock``; True if it is done.

    ``seconds=None`` waits as long as it takes. The same number of real seconds bounds
    the wait too, so a fake clock that nobody advances cannot hang the caller.
    """
    if future.done():
        return True
    done = threading.Event()
    future.add_done_callback(lambda _: done.set())
    timer = clock.call_later(seconds, done.set) if seconds is not None else None
    done.wait(None if seconds is None else min(seconds, threading.TIMEOUT_MAX))
    if timer is not None:
        timer.cancel()
    return future.done()

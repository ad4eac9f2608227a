"""Helpers for testing code that uses ``serve_core``: a clock that moves only when told to.

Pass a :class:`FakeClock` to ``Serve(clock=...)`` and every wait of the instance — query
deadlines, batch waits, the waiting room's timeout, the shutdown drain — becomes a timer
that fires only when the test calls :meth:`FakeClock.advance`. On the inline executor a
test is then fully deterministic, with no sleeps::

    from serve_core import BackendConfig, Serve
    from serve_core.testing import FakeClock

    clock = FakeClock()
    with Serve(executor="inline", start_server=False, clock=clock) as srv:
        future = srv.get_handle("not-linked-yet", missing_ok=True).remote()
        clock.advance(30.0)        # the waiting room's timeout fires here, in this thread
        assert future.done()
"""

from __future__ import annotations

import threading

from .clock import Callback, Timer, TimerHeap, fire

__all__ = ["FakeClock"]


class FakeClock:
    """A monotonic clock (and wall clock) that moves only when :meth:`advance` is called.

    Args:
        start: the initial ``monotonic()`` reading.
        wall_offset: ``wall() - monotonic()``, constant (seconds since the Unix epoch).
    """

    def __init__(self, start: float = 1000.0, wall_offset: float = 1.7e9) -> None:
        self.now = start
        self.wall_offset = wall_offset
        self._timers = TimerHeap()
        self._advancing = threading.RLock()  # one advance() at a time; a timer's callback may advance too

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + self.wall_offset

    def call_at(self, when: float, callback: Callback) -> Timer:
        timer = Timer(when, callback)
        with self._timers.lock:
            self._timers.push(timer)
        return timer

    def call_later(self, delay: float, callback: Callback) -> Timer:
        return self.call_at(self.now + delay, callback)

    def advance(self, seconds: float) -> None:
        """Move time forward, firing the timers that fall due, in time order, in this thread.

        While a timer's callback runs, ``monotonic()`` reads that timer's due time, and
        timers it arms that fall due before the end of the step fire in this call too.
        """
        if seconds < 0:
            raise ValueError(f"a clock cannot go back: advance({seconds})")
        with self._advancing:
            target = self.now + seconds
            while True:
                with self._timers.lock:
                    timer = self._timers.pop_due(target)
                if timer is None:
                    break
                self.now = max(self.now, timer.when)
                fire(timer)
            self.now = max(self.now, target)  # a callback's own advance() may have gone further

    @property
    def pending(self) -> int:
        """Timers armed and not yet fired nor cancelled."""
        with self._timers.lock:
            return len(self._timers)

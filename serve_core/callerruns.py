"""When a caller may run its call itself (caller-runs, docs/executors.md).

A caller that blocks on its answer (the WSGI front's request thread) and finds its replica
free may run a synchronous call in its own thread instead of handing it to the replica's
thread and sleeping until the answer comes back: two thread wake-ups saved per call. The
runtime asks :func:`may_run_here` at dispatch.

A call running in the caller's thread cannot be abandoned: if the caller waits with a
timeout (``http_request_timeout_s``), the call must not be one that could outlast it. So a
caller with a timeout runs only calls of a backend whose recent calls were all short:
:class:`RecentLongest` keeps the longest call of the last :data:`RECENT_S` seconds, and it
must fit :data:`MARGIN` times in the timeout. A backend with no call that recent runs its
next call on the replica's thread, where a timeout can answer for it (so a backend's very
first call never runs in a caller that has a timeout).
"""

from __future__ import annotations

import math

MARGIN = 10.0
"""The longest recent call times this must fit in a caller's timeout for the caller to run a call."""

RECENT_S = 60.0
"""How far back :class:`RecentLongest` looks (between one and two halves of it, in fact)."""


class RecentLongest:
    """The longest call seen in the last :data:`RECENT_S` seconds (two rotating halves: O(1))."""

    __slots__ = ("_half", "_start", "_current", "_previous")

    def __init__(self, recent_s: float = RECENT_S) -> None:
        self._half = recent_s / 2
        self._start = -math.inf  # when the current half began
        self._current: float | None = None  # the longest call of the current half
        self._previous: float | None = None  # ... and of the one before it

    def observe(self, seconds: float, now: float) -> None:
        self._rotate(now)
        if self._current is None or seconds > self._current:
            self._current = seconds

    def longest(self, now: float) -> float | None:
        """The longest recent call, or None when no call is that recent."""
        self._rotate(now)
        if self._previous is None:
            return self._current
        if self._current is None:
            return self._previous
        return max(self._current, self._previous)

    def _rotate(self, now: float) -> None:
        if now - self._start < self._half:
            return
        if now - self._start < 2 * self._half:
            self._previous = self._current
        else:  # more than a whole window since: nothing left that recent
            self._previous = None
        self._current = None
        self._start = now


def may_run_here(caller_timeout_s: float | None, longest: RecentLongest, now: float) -> bool:
    """Whether a caller waiting ``caller_timeout_s`` (None: as long as it takes) may run the call itself."""
    if caller_timeout_s is None:
        return True
    recent = longest.longest(now)
    return recent is not None and recent * MARGIN <= caller_timeout_s

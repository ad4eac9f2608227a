"""``ServeFuture``: the future of a call, light enough to be made for every query.

A ``concurrent.futures.Future`` in every way callers can see (``result``, ``cancel``,
callbacks, ``concurrent.futures.wait``/``as_completed``, ``await``), built for a hot path:

* **No ``threading.Condition`` until something waits.** ``Future.__init__`` builds one
  (1.3 KiB of the 1.6 a Future weighs, and 0.5 us), which a queued query does not need,
  nor a query whose caller reads its answer only once it is there. Here the state is
  guarded by a plain re-entrant lock, and the condition, built on that same lock, is made
  on first use (a waiter in ``result()``, ``wait()``, a callback added while pending).
* **The owner's transitions take only that lock** (:meth:`set_running_or_notify_cancel`,
  :meth:`set_result`, :meth:`set_exception`: the same rules as the stdlib's) and notify the
  condition if there is one. Safe because a waiter can only wait on the condition while
  holding the lock and having seen the state pending: a transition holding the lock either
  sees the condition (and notifies it) or no waiter exists yet (and the next one sees the
  new state).
* **A finished future answers ``result()`` without a lock** (``FINISHED`` is final, and its
  value is written before its state).

``tests/test_queues.py`` checks that a ``ServeFuture`` has every field a stdlib ``Future``
has, so a Python release that adds one fails there, not in production.
"""

from __future__ import annotations

import dataclasses
import threading
from _thread import RLock as _RLock  # threading.RLock is a Python function returning this
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from typing import Any

_OVER = frozenset({CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED})


@dataclasses.dataclass(slots=True)
class Timing:
    """Where and how long a query spent, attached to its future by the runtime before it is answered.

    ``queue_s`` is the time queued until a replica was free for it, ``batch_wait_s`` the time
    a free replica then held its batch open to fill (``batch_wait_timeout_s``; 0 otherwise),
    ``execution_s`` the time of the replica call it was part of. Set for web queries that
    reached a replica (the HTTP front's ``Server-Timing`` header and access log read it).
    Treat it as immutable: it is not frozen because one is built per web query, and a frozen
    dataclass's ``__init__`` costs three times more.
    """

    backend: str
    replica: str
    queue_s: float
    batch_wait_s: float
    execution_s: float


class ServeFuture(Future):
    """A ``concurrent.futures.Future`` that can also be awaited from asyncio, from any loop.

    ``timing`` is the query's :class:`Timing` once it is answered, when the runtime recorded one.

    :meth:`cancel` also reaches a running call (an ``async def`` backend's task); cancelling
    the asyncio task that awaits this future cancels it the same way.
    """

    timing: Timing | None = None
    # Class-level defaults: a future that is never cancelled costs nothing per instance.
    _canceller: Callable[[], bool] | None = None
    _cancel_wanted = False

    def __init__(self) -> None:  # Future's fields, without its Condition (see the module docstring)
        self._lock = _RLock()  # re-entrant as the stdlib's: wait() calls f.exception() holding it
        self._state = PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Callable[[Future[Any]], object]] = []

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        condition = self.__dict__.get("_built_condition")
        if condition is None:
            # dict.setdefault is atomic: threads racing here all get the one that was stored.
            condition = self.__dict__.setdefault("_built_condition", threading.Condition(self._lock))
        return condition

    def _notify(self) -> None:
        """Wake the waiters, if any ever waited (with the lock held)."""
        condition = self.__dict__.get("_built_condition")
        if condition is not None:
            condition.notify_all()

    def set_running_or_notify_cancel(self) -> bool:
        with self._lock:
            if self._state == PENDING:
                self._state = RUNNING
                return True
            if self._state == CANCELLED:
                self._state = CANCELLED_AND_NOTIFIED
                for waiter in self._waiters:
                    waiter.add_cancelled(self)
                return False  # cancel() has notified
            raise RuntimeError(f"Future in unexpected state: {self._state}")

    def set_result(self, result: Any) -> None:
        with self._lock:
            if self._state in _OVER:
                raise InvalidStateError(f"{self._state}: {self!r}")
            self._result = result
            self._state = FINISHED
            for waiter in self._waiters:
                waiter.add_result(self)
            self._notify()
        self._invoke_callbacks()  # type: ignore[attr-defined]  # concurrent.futures.Future, not in typeshed

    def set_exception(self, exception: BaseException | None) -> None:
        with self._lock:
            if self._state in _OVER:
                raise InvalidStateError(f"{self._state}: {self!r}")
            self._exception = exception
            self._state = FINISHED
            for waiter in self._waiters:
                waiter.add_exception(self)
            self._notify()
        self._invoke_callbacks()  # type: ignore[attr-defined]  # concurrent.futures.Future, not in typeshed

    def result(self, timeout: float | None = None) -> Any:
        if self._state == FINISHED and self._exception is None:
            return self._result
        return super().result(timeout)

    def done(self) -> bool:
        return self._state in _OVER

    def __await__(self) -> Any:
        import asyncio

        return asyncio.wrap_future(self).__await__()

    def cancel(self) -> bool:
        """Withdraw the query if it is queued; ask its replica to cancel it if it is running.

        Returns:
            True if the query was withdrawn (it resolves cancelled, as a stdlib future), or if the
            running call's replica took the request: an async call's task is cancelled and the
            future resolves with :class:`concurrent.futures.CancelledError` (or with the call's
            answer, if it finished first or swallowed the cancellation, as with
            ``asyncio.Task.cancel``). False when the future is done, or its call cannot be
            cancelled (synchronous code, a batch, an executor without cancellation), or it was
            being handed to its replica at that instant: then the request is kept and reaches the
            call as soon as it is there.
        """
        if super().cancel():
            return True
        if self.done():
            return False
        self._cancel_wanted = True
        canceller = self._canceller
        return canceller() if canceller is not None else False

    def set_canceller(self, canceller: Callable[[], bool]) -> None:
        """Register how to cancel the running call (the runtime, once its replica holds it).

        A :meth:`cancel` that came while the call was on its way is delivered now. Either side
        may see the other's write (both are plain attribute writes under the GIL), so the
        canceller may run twice: replicas' cancels are idempotent.
        """
        self._canceller = canceller
        if self._cancel_wanted and not self.done():
            canceller()

"""The inline executor: replicas run in the calling thread, synchronously.

Deterministic and thread-free, for unit tests. ``submit`` returns an already
resolved future, with one exception: a coroutine method called from a thread that runs
an event loop (code inside ``asyncio.run(...)``, an async web framework) becomes a task on
that loop, and the future resolves when the task completes, so ``await handle.remote()``
works there and several such calls run at once (up to ``max_concurrent_queries``).
Blocking on ``.result()`` on the loop's own thread would wait for a task that loop can no
longer run: await the future instead. Those tasks can be cancelled (:meth:`InlineReplica.cancel`).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from functools import partial

from ..errors import NotDeliveredError
from ..invoke import Invoker, cancelled_error, is_async_target
from .base import Call, Outcome, ReplicaSpec

Task = tuple[asyncio.AbstractEventLoop, "asyncio.Task[list[Outcome]]"]


class InlineReplica:
    """A backend object called directly by whoever submits."""

    default_max_concurrent_queries = 1

    def __init__(self, spec: ReplicaSpec) -> None:
        self.replica_id = spec.replica_id
        self._invoker: Invoker | None = Invoker(spec.target, spec.init_args)
        self._async = is_async_target(spec.target)
        self._tasks: dict[Future[list[Outcome]], Task] = {}  # calls running as tasks on a caller's loop

    @property
    def alive(self) -> bool:
        return self._invoker is not None

    def submit(self, call: Call) -> Future[list[Outcome]]:
        future: Future[list[Outcome]] = Future()
        future.set_running_or_notify_cancel()
        invoker = self._invoker
        if invoker is None:
            future.set_exception(NotDeliveredError(f"replica {self.replica_id} was stopped"))
        elif self._async and invoker.awaits(call.method) and (loop := _running_loop()) is not None:
            task = loop.create_task(invoker.run_async(call))
            self._tasks[future] = (loop, task)
            task.add_done_callback(partial(self._finished, future, len(call)))
        else:
            future.set_result(invoker.run(call))
        return future

    def cancel(self, future: Future[list[Outcome]]) -> bool:
        """Cancel the task of a call running on a caller's loop; False for any other call."""
        entry = self._tasks.get(future)
        if entry is None:
            return False
        loop, task = entry
        try:
            loop.call_soon_threadsafe(task.cancel)  # cancel may come from any thread
        except RuntimeError:  # that loop is closed: the task has ended
            return False
        return True

    def stop(self, drain_timeout: float | None = None) -> None:
        """Stop taking calls; calls running as tasks finish on their loops."""
        if self._invoker is not None:
            self._invoker.close()
            self._invoker = None

    def _finished(self, future: Future[list[Outcome]], size: int, task: asyncio.Task[list[Outcome]]) -> None:
        del self._tasks[future]
        if task.cancelled():  # before its coroutine started (e.g. asyncio.run ending)
            future.set_result([Outcome(False, cancelled_error())] * size)
        else:
            future.set_result(task.result())  # run_async never raises


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class InlineExecutor:
    """Runs every replica in the caller's thread."""

    name = "inline"
    places_replicas = False

    def start_replica(self, spec: ReplicaSpec) -> InlineReplica:
        return InlineReplica(spec)

    def shutdown(self) -> None:
        pass

"""The inline executor: replicas run in the calling thread, synchronously.

Deterministic and thread-free, for unit tests. ``submit`` returns an already
resolved future, with one exception: a coroutine method called from a thread that runs
an event loop (code inside ``asyncio.run(...)``, an async web framework) becomes a task on
that loop, and the future resolves when the task completes, so ``await handle.remote()``
works there and several such calls run at once (up to ``max_concurrent_queries``).
Blocking on ``.result()`` on the loop's own thread would wait for a task that loop can no
longer run: await the future instead. Those tasks can be cancelled (:meth:`InlineReplica.cancel`).

A loop that ends (``asyncio.run`` returning) cancels its tasks, and a task finishing then frees
its replica for the next queued call, which would become a task the ending loop never runs. So
each loop gets a watcher: an async generator that the loop's ``shutdown_asyncgens()`` closes
(``asyncio.run``, ``IsolatedAsyncioTestCase`` and pytest-asyncio all call it). Its ``finally``
answers the calls still running there with ``CancelledError`` (and cancels their tasks), and
from then on calls dispatched on that loop run to completion inside ``submit``, as without a loop.

A generator backend's call is answered at its first item with a :class:`~._stream.PullStream`:
each read of the stream runs the generator's next step in the reader's thread (or task).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncGenerator
from concurrent.futures import Future
from functools import partial

from ..errors import NotDeliveredError
from ..invoke import Invoker, cancelled_error, is_async_target
from ._stream import PullStream, generated_of
from .base import Call, Outcome, ReplicaSpec

Loop = asyncio.AbstractEventLoop
Task = tuple[Loop, "asyncio.Task[list[Outcome]]", int]  # its loop, the task, the call's size


class InlineReplica:
    """A backend object called directly by whoever submits."""

    default_max_concurrent_queries = 1
    # A call to its own backend made inside a call joins the dispatch loop running it: it starts only
    # once the outer call returned (executors.base.SERIAL_ATTRIBUTE).
    serial = True

    def __init__(self, spec: ReplicaSpec) -> None:
        self.replica_id = spec.replica_id
        self._invoker: Invoker | None = Invoker(spec.target, spec.init_args, scope=spec.scope)
        self._async = is_async_target(spec.target)
        self._tasks: dict[Future[list[Outcome]], Task] = {}  # calls running as tasks on a caller's loop
        self._watchers: weakref.WeakKeyDictionary[Loop, AsyncGenerator[None, None]] = weakref.WeakKeyDictionary()
        self._ended: weakref.WeakSet[Loop] = weakref.WeakSet()  # loops whose shutdown began

    @property
    def alive(self) -> bool:
        return self._invoker is not None

    def submit(self, call: Call) -> Future[list[Outcome]]:
        future: Future[list[Outcome]] = Future()
        future.set_running_or_notify_cancel()
        invoker = self._invoker
        if invoker is None:
            future.set_exception(NotDeliveredError(f"replica {self.replica_id} was stopped"))
        elif self._async and invoker.awaits(call.method) and (loop := self._task_loop()) is not None:
            task = loop.create_task(_run_async(invoker, call))
            self._tasks[future] = (loop, task, len(call))
            task.add_done_callback(partial(self._finished, future, len(call)))
        else:
            outcomes = invoker.run(call)
            gen = generated_of(outcomes)
            future.set_result(outcomes if gen is None else [PullStream.opened(gen)])
        return future

    def cancel(self, future: Future[list[Outcome]]) -> bool:
        """Cancel the task of a call running on a caller's loop; False for any other call."""
        entry = self._tasks.get(future)
        if entry is None:
            return False
        loop, task, _ = entry
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

    def _task_loop(self) -> Loop | None:
        """The running loop of this thread, if a call may become a task on it (watching it from now on)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        if loop in self._ended:
            return None
        if loop not in self._watchers:
            watcher = self._watch(loop)
            # Advanced to its first yield here, in the loop's thread: that registers it with the
            # loop (its asyncgen hooks), so shutdown_asyncgens() will close it.
            with contextlib.suppress(StopIteration):  # how a step that reached the yield ends
                watcher.asend(None).send(None)
            self._watchers[loop] = watcher
        return loop

    async def _watch(self, loop: Loop) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            self._ended.add(loop)
            for future, (task_loop, task, size) in list(self._tasks.items()):
                if task_loop is loop and self._tasks.pop(future, None) is not None:
                    task.cancel()  # its finally blocks run if the loop steps once more
                    error = cancelled_error()
                    error.__cause__ = RuntimeError("the event loop running the call was shutting down")
                    future.set_result([Outcome(False, error)] * size)

    def _finished(self, future: Future[list[Outcome]], size: int, task: asyncio.Task[list[Outcome]]) -> None:
        if self._tasks.pop(future, None) is None:
            return  # answered when its loop shut down
        if task.cancelled():  # before its coroutine started
            future.set_result([Outcome(False, cancelled_error())] * size)
        else:
            future.set_result(task.result())  # run_async never raises


async def _run_async(invoker: Invoker, call: Call) -> list[Outcome]:
    outcomes = await invoker.run_async(call)
    gen = generated_of(outcomes)
    return outcomes if gen is None else [await PullStream.aopened(gen)]


class InlineExecutor:
    """Runs every replica in the caller's thread."""

    name = "inline"
    places_replicas = False

    def start_replica(self, spec: ReplicaSpec) -> InlineReplica:
        return InlineReplica(spec)

    def shutdown(self) -> None:
        pass

"""One event loop per replica, on a thread of its own: how async backends run concurrently.

A :class:`CallLoop` builds an :func:`~serve_core.invoke.is_async_target` backend on its loop
and runs each call as a task there (:meth:`Invoker.run_async
<serve_core.invoke.Invoker.run_async>`), so a replica holds as many calls at once as its
runtime hands it (``max_concurrent_queries``). Calls arrive from other threads with
``call_soon_threadsafe``, each under a key chosen by the caller (a future, a sequence
number), by which :meth:`CallLoop.cancel` cancels its task. The thread executor's
:class:`~serve_core.executors.thread.LoopReplica` and the process executor's worker (for
async backends) both run their calls on one.

Every accepted call reports exactly once through its ``done`` callback, on the loop's
thread: its outcomes, :func:`~serve_core.invoke.cancelled_error` outcomes when its task was
cancelled before it ran, or ``None`` when the loop ended without running it (it died, or
:meth:`CallLoop.stop` was told not to drain). ``submit`` and ``stop`` decide under one lock
whether a call is accepted, and the drain request queues behind every accepted call.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from functools import partial
from typing import Any, cast

from ..composition import ReplicaScope
from ..invoke import Invoker, cancelled_error
from ._stream import aopen_stream, apump, generated_of
from .base import Call, Outcome

Done = Callable[["list[Outcome] | None"], None]
"""Receives a call's outcomes, or ``None`` when it never ran."""

CANCEL_GRACE_S = 1.0
"""How long a stopping loop waits for its calls to end once it cancelled them after ``drain_timeout``."""


class CallLoop:
    """An event loop on its own thread, running one backend's calls as tasks.

    Args:
        name: the thread's name.
    """

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._accepting = True
        self._draining = False
        self._calls: dict[Hashable, tuple[Call, Done]] = {}  # accepted and not reported; any thread reads it
        self._tasks: dict[Hashable, asyncio.Task[list[Outcome] | None]] = {}  # the loop's thread only
        self.invoker: Invoker | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._accepting and self._thread.is_alive()

    def build(self, target: Any, init_args: tuple[Any, ...], scope: ReplicaScope | None = None) -> Invoker:
        """Build the backend on the loop (constructor and ``warmup``, inside ``scope``); raises what they raised."""
        built: Future[Invoker] = asyncio.run_coroutine_threadsafe(
            Invoker.started(target, init_args, scope), self._loop
        )
        try:
            self.invoker = built.result()
        except BaseException:
            built.cancel()
            self.stop(None)
            raise
        return self.invoker

    def submit(self, key: Hashable, call: Call, done: Done) -> bool:
        """Run ``call`` under ``key`` (unique while it runs); False when the loop no longer accepts calls."""
        with self._lock:
            if not self._accepting or self.invoker is None:
                return False
            self._calls[key] = (call, done)
            self._loop.call_soon_threadsafe(self._start, key, call)
        return True

    def cancel(self, key: Hashable) -> bool:
        """Cancel the task of the call under ``key``, from any thread.

        Returns:
            True when the request went to the loop: the call answers ``CancelledError`` if its
            coroutine was still running (or its answer, if it finished first or swallowed the
            cancellation). False when no such call runs, or it runs a synchronous method
            (which holds the loop until it returns: nothing can interrupt it).
        """
        entry = self._calls.get(key)
        if entry is None or self.invoker is None or not self.invoker.awaits(entry[0].method):
            return False
        try:
            self._loop.call_soon_threadsafe(self._cancel, key)
        except RuntimeError:  # the loop is closed: the call has been reported
            return False
        return True

    def stop(self, drain_timeout: float | None, *, drain: bool = True) -> None:
        """Accept no more calls; finish those accepted (``drain=False``: cancel them), then end the thread.

        Waits up to ``drain_timeout`` seconds (None: no limit) unless called from the loop itself;
        the calls still running then are cancelled (what a process replica's kill does to them,
        without losing the replica's cleanup), and the thread gets :data:`CANCEL_GRACE_S` more.
        """
        with self._lock:
            if self._accepting:
                self._accepting = False
                self._call_soon(self._drain, drain)
        if threading.current_thread() is self._thread:
            return
        self._thread.join(drain_timeout)
        if self._thread.is_alive() and drain:
            self._call_soon(self._drain, False)
            self._thread.join(CANCEL_GRACE_S)

    def _call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass  # the loop has ended already

    # -------------------------------------------------------- on the loop's thread
    def _start(self, key: Hashable, call: Call) -> None:
        task = self._loop.create_task(self._serve(key, call))
        self._tasks[key] = task
        task.add_done_callback(partial(self._finished, key))

    async def _serve(self, key: Hashable, call: Call) -> list[Outcome] | None:
        """Run the call; a stream is reported at its first item, then pumped here (returns None)."""
        invoker = cast(Invoker, self.invoker)  # submit accepts calls only once it is built
        outcomes = await invoker.run_async(call)
        gen = generated_of(outcomes)
        if gen is None:
            return outcomes
        outcome, channel = await aopen_stream(gen)
        _, done = self._calls.pop(key)
        done([outcome])
        if channel is not None:
            await apump(gen, channel)
        return None

    def _finished(self, key: Hashable, task: asyncio.Task[list[Outcome] | None]) -> None:
        del self._tasks[key]
        entry = self._calls.pop(key, None)  # None: a stream, reported at its first item
        try:
            if entry is None:
                pass
            elif task.cancelled():  # before its coroutine started: run_async never saw it
                entry[1]([Outcome(False, cancelled_error())] * len(entry[0]))
            else:
                entry[1](cast("list[Outcome]", task.result()))  # _serve never raises
        finally:
            if self._draining and not self._tasks:
                self._loop.stop()

    def _cancel(self, key: Hashable) -> None:
        task = self._tasks.get(key)
        if task is not None:
            task.cancel()

    def _drain(self, drain: bool) -> None:
        self._draining = True
        if not drain:
            for task in self._tasks.values():
                task.cancel()
        if not self._tasks:
            self._loop.stop()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            with self._lock:
                self._accepting = False
            self._close()

    def _close(self) -> None:
        loop = self._loop
        self._draining = False  # the tasks finishing below must not stop the loop under run_until_complete
        try:
            for task in self._tasks.values():  # only when the loop itself failed: nothing else leaves tasks
                task.cancel()
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            if self.invoker is not None:
                self.invoker.close()
            loop.close()
            leftovers, self._calls = self._calls, {}
            for _, done in leftovers.values():
                done(None)

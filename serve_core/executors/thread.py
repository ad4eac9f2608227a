"""The thread executor: one worker thread per replica, in this process.

The default executor. Good for I/O-bound backends and for code that releases the
GIL (numpy); CPU-bound pure Python wants the process executor.

A synchronous backend gets a :class:`ThreadReplica`: a worker thread taking calls off a
queue, one at a time. An async backend (:func:`~serve_core.invoke.is_async_target`) gets a
:class:`LoopReplica`: an event loop on its thread, running every call it holds as a task,
so up to ``max_concurrent_queries`` calls at once, each cancellable while it awaits.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from functools import partial

from ..errors import NotDeliveredError, ReplicaDiedError
from ..invoke import Invoker, is_async_target
from ._loop import CallLoop
from ._stream import PullStream, generated_of, open_stream, pump
from .base import Call, Outcome, ReplicaSpec

_STOP = None  # sentinel on a replica's work queue

Work = tuple[Call, "Future[list[Outcome]]"]


class ThreadReplica:
    """A backend object served by its own worker thread.

    Every call is either put on the work queue before the stop sentinel, so the worker
    runs it, or refused with ``NotDeliveredError``: ``submit`` and ``stop`` decide that
    under one lock, and a worker that dies refuses what comes after.
    """

    default_max_concurrent_queries = 1
    in_process = True  # base.Replica: the runtime gives the next call to the replica freed last
    serial = True  # one call at a time on its thread (executors.base.SERIAL_ATTRIBUTE)

    def __init__(self, spec: ReplicaSpec) -> None:
        self.replica_id = spec.replica_id
        self._invoker = Invoker(spec.target, spec.init_args, scope=spec.scope)
        self._work: queue.SimpleQueue[Work | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._loop, name=f"serve-replica-{spec.replica_id}", daemon=True
        )
        self._thread.start()

    @property
    def alive(self) -> bool:
        return not self._stopping and self._thread.is_alive()

    def submit(self, call: Call) -> Future[list[Outcome]]:
        future: Future[list[Outcome]] = Future()
        with self._lock:
            if not self._stopping:
                self._work.put((call, future))
                return future
        future.set_exception(NotDeliveredError(f"replica {self.replica_id} was stopped"))
        return future

    def run_here(self, call: Call) -> list[Outcome]:
        """Run ``call`` in the calling thread (caller-runs: the runtime holds no other call here).

        Raises:
            NotDeliveredError: the replica was stopped (its worker ended).
        """
        if self._stopping:
            raise NotDeliveredError(f"replica {self.replica_id} was stopped")
        outcomes = self._invoker.run(call)  # never raises: every failure is an outcome
        gen = generated_of(outcomes)
        # A stream's next steps run in its reader's thread (the caller's), as on the inline
        # executor; the runtime keeps the replica taken until the stream ends.
        return outcomes if gen is None else [PullStream.opened(gen)]

    def stop(self, drain_timeout: float | None = None) -> None:
        with self._lock:
            if not self._stopping:
                self._stopping = True
                self._work.put(_STOP)
        if threading.current_thread() is not self._thread:
            self._thread.join(drain_timeout)

    def _loop(self) -> None:
        try:
            while (item := self._work.get()) is not _STOP:
                call, future = item
                if future.set_running_or_notify_cancel():
                    try:
                        self._run(call, future)
                    except BaseException as exc:  # noqa: BLE001 - never leave a future running
                        future.set_exception(ReplicaDiedError(f"replica {self.replica_id} failed: {exc!r}"))
                        raise
        finally:
            with self._lock:  # nothing new lands on the queue from here on
                self._stopping = True
            self._invoker.close()
            self._refuse_leftovers()

    def _run(self, call: Call, future: Future[list[Outcome]]) -> None:
        outcomes = self._invoker.run(call)
        gen = generated_of(outcomes)
        if gen is None:
            future.set_result(outcomes)
            return
        outcome, channel = open_stream(gen)  # answered at its first item, then pumped on this thread
        future.set_result([outcome])
        if channel is not None:
            pump(gen, channel)

    def _refuse_leftovers(self) -> None:
        # Calls queued behind a call that killed the worker never ran.
        while True:
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and item[1].set_running_or_notify_cancel():
                item[1].set_exception(NotDeliveredError(f"replica {self.replica_id} was stopped"))


class LoopReplica:
    """An async backend served by an event loop on its own thread, several calls at once.

    The backend is built on that loop. Calls are tasks keyed by their future; a synchronous
    method of the backend runs on the loop too, holding it while it runs.
    """

    default_max_concurrent_queries = 1  # the original's rule; max_concurrent_queries raises it
    in_process = True

    def __init__(self, spec: ReplicaSpec) -> None:
        self.replica_id = spec.replica_id
        self._calls = CallLoop(f"serve-replica-{spec.replica_id}")
        self._calls.build(spec.target, spec.init_args, spec.scope)

    run_here = None  # calls run as tasks on the replica's loop (base.CallerRunsReplica)

    @property
    def alive(self) -> bool:
        return self._calls.running

    def submit(self, call: Call) -> Future[list[Outcome]]:
        future: Future[list[Outcome]] = Future()
        future.set_running_or_notify_cancel()
        if not self._calls.submit(future, call, partial(self._answer, future)):
            future.set_exception(NotDeliveredError(f"replica {self.replica_id} was stopped"))
        return future

    def cancel(self, future: Future[list[Outcome]]) -> bool:
        """Cancel the task of the running call ``submit`` returned ``future`` for (see :meth:`CallLoop.cancel`)."""
        return self._calls.cancel(future)

    def stop(self, drain_timeout: float | None = None) -> None:
        self._calls.stop(drain_timeout)

    def _answer(self, future: Future[list[Outcome]], outcomes: list[Outcome] | None) -> None:
        if outcomes is None:
            future.set_exception(ReplicaDiedError(f"the event loop of replica {self.replica_id} ended"))
        else:
            future.set_result(outcomes)


class ThreadExecutor:
    """Starts a worker thread per replica (an event-loop thread for an async backend)."""

    name = "thread"
    places_replicas = False

    def start_replica(self, spec: ReplicaSpec) -> ThreadReplica | LoopReplica:
        if is_async_target(spec.target):
            return LoopReplica(spec)
        return ThreadReplica(spec)

    def shutdown(self) -> None:
        pass

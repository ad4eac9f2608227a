"""The thread executor: one worker thread per replica, in this process.

The default executor. Good for I/O-bound backends and for code that releases the
GIL (numpy); CPU-bound pure Python wants the process executor.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

from ..errors import NotDeliveredError, ReplicaDiedError
from ..invoke import Invoker
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

    def __init__(self, spec: ReplicaSpec) -> None:
        self.replica_id = spec.replica_id
        self._invoker = Invoker(spec.target, spec.init_args)
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
                        future.set_result(self._invoker.run(call))
                    except BaseException as exc:  # noqa: BLE001 - never leave a future running
                        future.set_exception(ReplicaDiedError(f"replica {self.replica_id} failed: {exc!r}"))
                        raise
        finally:
            with self._lock:  # nothing new lands on the queue from here on
                self._stopping = True
            self._invoker.close()
            self._refuse_leftovers()

    def _refuse_leftovers(self) -> None:
        # Calls queued behind a call that killed the worker never ran.
        while True:
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and item[1].set_running_or_notify_cancel():
                item[1].set_exception(NotDeliveredError(f"replica {self.replica_id} was stopped"))


class ThreadExecutor:
    """Starts a worker thread per replica."""

    name = "thread"
    places_replicas = False

    def start_replica(self, spec: ReplicaSpec) -> ThreadReplica:
        return ThreadReplica(spec)

    def shutdown(self) -> None:
        pass

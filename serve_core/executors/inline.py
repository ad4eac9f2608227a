"""The inline executor: replicas run in the calling thread, synchronously.

Deterministic and thread-free, for unit tests. ``submit`` returns an already
resolved future.
"""

from __future__ import annotations

from concurrent.futures import Future

from ..errors import NotDeliveredError
from ..invoke import Invoker
from .base import Call, Outcome, ReplicaSpec


class InlineReplica:
    """A backend object called directly by whoever submits."""

    default_max_concurrent_queries = 1

    def __init__(self, spec: ReplicaSpec) -> None:
        self.replica_id = spec.replica_id
        self._invoker: Invoker | None = Invoker(spec.target, spec.init_args)

    @property
    def alive(self) -> bool:
        return self._invoker is not None

    def submit(self, call: Call) -> Future[list[Outcome]]:
        future: Future[list[Outcome]] = Future()
        future.set_running_or_notify_cancel()
        if self._invoker is None:
            future.set_exception(NotDeliveredError(f"replica {self.replica_id} was stopped"))
        else:
            future.set_result(self._invoker.run(call))
        return future

    def stop(self, drain_timeout: float | None = None) -> None:
        if self._invoker is not None:
            self._invoker.close()
            self._invoker = None


class InlineExecutor:
    """Runs every replica in the caller's thread."""

    name = "inline"
    places_replicas = False

    def start_replica(self, spec: ReplicaSpec) -> InlineReplica:
        return InlineReplica(spec)

    def shutdown(self) -> None:
        pass

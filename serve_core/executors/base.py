"""The executor contract: where replicas run and how calls reach them.

Shaped after ``concurrent.futures``: :meth:`Executor.start_replica` builds a replica,
:meth:`Replica.submit` runs one :class:`~serve_core.invoke.Call` and returns a stdlib
``Future`` resolving to one :class:`~serve_core.invoke.Outcome` per query. User
exceptions are outcomes, not failures of the future; the future fails only when the
replica itself broke (then with :class:`~serve_core.errors.ReplicaDiedError`).

Executors are named; :func:`create_executor` imports the implementation lazily, so
``import serve_core`` never imports Ray.
"""

from __future__ import annotations

import dataclasses
import importlib
from concurrent.futures import Future
from typing import Any, Protocol, runtime_checkable

from ..config import BackendConfig
from ..errors import NotFoundError, ServeStateError, ServeTypeError
from ..invoke import Call, Outcome

EXECUTORS: dict[str, str] = {
    "inline": "serve_core.executors.inline:InlineExecutor",
    "thread": "serve_core.executors.thread:ThreadExecutor",
    "process": "serve_core.executors.process:ProcessExecutor",
    "ray": "serve_core.executors.ray:RayExecutor",
}
"""Executor names and the classes that implement them (imported on first use)."""


@dataclasses.dataclass(frozen=True)
class ReplicaSpec:
    """Everything an executor needs to build one replica."""

    backend_tag: str
    replica_id: str
    target: Any
    init_args: tuple[Any, ...]
    config: BackendConfig


@runtime_checkable
class Replica(Protocol):
    """One running copy of a backend.

    It holds up to the backend's ``max_concurrent_queries`` calls at once. When the
    config leaves that to the executor (``None``), the router reads the replica's
    optional ``default_max_concurrent_queries`` attribute, else uses 1.

    A call the replica never started (it was stopped, or died before the call reached
    it) fails with :class:`~serve_core.errors.NotDeliveredError`: the router puts its
    queries back in the queue. Any other failure fails the call's queries.
    """

    replica_id: str

    @property
    def alive(self) -> bool: ...

    def submit(self, call: Call) -> Future[list[Outcome]]: ...

    def stop(self, drain_timeout: float | None = None) -> None:
        """Finish accepted calls (up to ``drain_timeout`` seconds), then release resources."""


@runtime_checkable
class Executor(Protocol):
    """Places replicas. ``start_replica`` raises if the user's constructor fails."""

    name: str

    def start_replica(self, spec: ReplicaSpec) -> Replica: ...

    def shutdown(self) -> None: ...


def create_executor(name_or_executor: str | Executor, **options: Any) -> Executor:
    """Build an executor from its registered name, or pass an executor object through."""
    if not isinstance(name_or_executor, str):
        if not isinstance(name_or_executor, Executor):
            raise ServeTypeError("executor must be a name or an object with start_replica/shutdown")
        return name_or_executor
    path = EXECUTORS.get(name_or_executor)
    if path is None:
        raise NotFoundError(
            f"unknown executor {name_or_executor!r}; choose one of {sorted(EXECUTORS)}"
        )
    module_name, _, class_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ServeStateError(
            f"executor {name_or_executor!r} is not available: {exc}; install its extra, "
            f"e.g. pip install 'serve-core[{name_or_executor}]'"
        ) from exc
    cls = getattr(module, class_name)
    return cls(**options)  # type: ignore[no-any-return, unused-ignore]

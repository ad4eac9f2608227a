"""The executor contract: where replicas run and how calls reach them.

Shaped after ``concurrent.futures``: :meth:`Executor.start_replica` builds a replica,
:meth:`Replica.submit` runs one :class:`Call` and returns a stdlib ``Future`` resolving
to one :class:`Outcome` per query. User exceptions are outcomes, not failures of the
future; the future fails only when the replica itself broke (then with
:class:`~serve_core.errors.ReplicaDiedError`).

Executors are named; :class:`ExecutorPool` builds them on first use through
:func:`create_executor`, which imports the implementation lazily (so ``import
serve_core`` never imports Ray) and hands each executor only the options it takes.
"""

from __future__ import annotations

import dataclasses
import importlib
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..config import BackendConfig
from ..errors import NotFoundError, ServeStateError, ServeTypeError

if TYPE_CHECKING:
    from ..composition import Origin, ReplicaScope


@dataclasses.dataclass(frozen=True)
class ExecutorEntry:
    """A registered executor: ``module:Class``, and the ``Serve`` options it takes."""

    path: str
    options: tuple[str, ...] = ()


EXECUTORS: dict[str, ExecutorEntry] = {
    "inline": ExecutorEntry("serve_core.executors.inline:InlineExecutor"),
    "thread": ExecutorEntry("serve_core.executors.thread:ThreadExecutor"),
    "process": ExecutorEntry("serve_core.executors.process:ProcessExecutor"),
    "ray": ExecutorEntry("serve_core.executors.ray:RayExecutor", ("ray_init_kwargs",)),
}
"""Executor names and the classes that implement them (imported on first use)."""


@dataclasses.dataclass(slots=True)
class Call:
    """One unit of work for a replica: a single query or a batch of queries.

    ``requests[i]`` is query i's web request (``None`` for Python calls) and
    ``kwargs[i]`` its keyword arguments. ``stream``: a generator the call returns may stream
    (web calls and ``options(stream=True)`` handles; never a batch). ``origin`` is the deadline and
    chain that calls made inside it inherit (:class:`~serve_core.composition.Origin`; None: no
    deadline, no chain). Treat it as immutable; it is not frozen because one is built for every
    call, and a frozen dataclass's ``__init__`` costs three times more.
    """

    method: str
    web: bool
    batched: bool
    requests: tuple[Any, ...]
    kwargs: tuple[dict[str, Any], ...]
    stream: bool = False
    origin: Origin | None = None

    def __len__(self) -> int:
        return len(self.kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt through __init__: several times faster to unpickle than the field-by-field
        # default of slotted dataclasses.
        if self.origin is None:
            return Call, (self.method, self.web, self.batched, self.requests, self.kwargs, self.stream)
        return Call, (self.method, self.web, self.batched, self.requests, self.kwargs, self.stream, self.origin)


@dataclasses.dataclass(slots=True)
class Outcome:
    """The answer to one query: a value, or the exception it raised (immutable by convention, as :class:`Call`)."""

    ok: bool
    value: Any

    def __reduce__(self) -> tuple[Any, ...]:
        return Outcome, (self.ok, self.value)  # fast to unpickle, as for Call


@dataclasses.dataclass(frozen=True)
class ReplicaSpec:
    """Everything an executor needs to build one replica.

    ``scope`` is what the replica's code is part of (its instance's link and its backend):
    the executor gives it to the replica's :class:`~serve_core.invoke.Invoker`, through a link
    of its own when the replica runs in another process (docs/composition.md). None: calls
    made inside the replica are not composed calls.
    """

    backend_tag: str
    replica_id: str
    target: Any
    init_args: tuple[Any, ...]
    config: BackendConfig
    scope: ReplicaScope | None = None


@runtime_checkable
class Replica(Protocol):
    """One running copy of a backend.

    It holds up to the backend's ``max_concurrent_queries`` calls at once; when the
    config leaves that to the executor (``None``), ``default_max_concurrent_queries``.

    A call the replica never started (it was stopped, or died before the call reached
    it) fails with :class:`~serve_core.errors.NotDeliveredError`: the backend's runtime
    puts its queries back in the queue. Any other failure fails the call's queries.
    """

    replica_id: str
    default_max_concurrent_queries: int

    @property
    def alive(self) -> bool: ...

    def submit(self, call: Call) -> Future[list[Outcome]]: ...

    def stop(self, drain_timeout: float | None = None) -> None:
        """Finish accepted calls (up to ``drain_timeout`` seconds), then release resources."""


IN_PROCESS_ATTRIBUTE = "in_process"
"""A replica's optional flag (read once with ``getattr``, default False): its calls run on a thread
of this process. The runtime then gives the next call to the free replica that finished last and
holds no other call (its thread has just run: waking it costs least, or nothing) instead of to the
one free the longest, so
100 thread replicas cost no more per call than one (issue 16); other replicas take calls in turn."""


SERIAL_ATTRIBUTE = "serial"
"""An optional attribute of a replica: True when it runs the calls it holds one after the other
(a synchronous backend on a thread, a worker process or a Ray actor), whatever its
``max_concurrent_queries``; or an inline replica, whose calls to their own backend wait for the
outer call to return. A call it runs that waits for another call to its own backend then
holds the whole replica: the loop-back rule counts one call per such replica
(:func:`serve_core.composition.check_chain`). Missing: False (an async replica runs its calls as tasks)."""


@runtime_checkable
class CancellableReplica(Replica, Protocol):
    """A replica that can cancel a call it is running: an optional addition to :class:`Replica`.

    ``cancel(future)`` takes a future its ``submit`` returned and asks the call to stop (an
    async call's task is cancelled). It returns True when the request was taken (the call then
    ends as usual, its queries answering ``concurrent.futures.CancelledError`` if it stopped),
    False when the call cannot be cancelled or is over; it is idempotent and may be called from
    any thread. The runtime uses it for single-query calls still running after ``submit``, so
    ``ServeFuture.cancel()`` reaches them. A replica whose calls can never be cancelled leaves
    ``cancel`` out (or sets it to ``None``): its calls then cost nothing extra.
    """

    def cancel(self, future: Future[list[Outcome]]) -> bool: ...


@runtime_checkable
class CallerRunsReplica(Replica, Protocol):
    """A replica whose synchronous calls may run in the thread that submits them: optional.

    ``run_here(call)`` runs the call in the calling thread and returns its outcomes (never a
    user's exception: those are outcomes), or raises
    :class:`~serve_core.errors.NotDeliveredError` when the replica is stopped. The runtime
    calls it only for a caller that would block on the answer anyway, when the replica holds
    no other call (so the one-call-at-a-time rule of the replica holds) and nothing needs the
    call on the replica's own thread (docs/executors.md, "Caller-runs"): the hand-off to the
    replica's thread and back, two thread wake-ups, is saved. A replica that cannot run a call
    here (an async backend, another process) sets ``run_here`` to ``None`` or leaves it out.
    """

    def run_here(self, call: Call) -> list[Outcome]: ...


@runtime_checkable
class Executor(Protocol):
    """Places replicas. ``start_replica`` raises if the user's constructor fails.

    ``places_replicas`` is True for executors that honour the placement hints of
    ``BackendConfig`` (``num_cpus``, ``num_gpus``, ``resources``...): the Ray executor.
    """

    name: str
    places_replicas: bool

    def start_replica(self, spec: ReplicaSpec) -> Replica: ...

    def shutdown(self) -> None: ...


def create_executor(name_or_executor: str | Executor, options: dict[str, Any] | None = None) -> Executor:
    """Build an executor from its registered name (with the options it takes), or pass one through.

    Args:
        name_or_executor: a name of :data:`EXECUTORS`, or an executor object.
        options: ``Serve``-level options; each executor gets only those its entry names.
    """
    if not isinstance(name_or_executor, str):
        if not isinstance(name_or_executor, Executor):
            raise ServeTypeError(
                "executor must be a name or an object with name, places_replicas, start_replica and shutdown"
            )
        return name_or_executor
    entry = EXECUTORS.get(name_or_executor)
    if entry is None:
        raise NotFoundError(
            f"unknown executor {name_or_executor!r}; choose one of {sorted(EXECUTORS)}"
        )
    module_name, _, class_name = entry.path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ServeStateError(
            f"executor {name_or_executor!r} is not available: {exc}; install its extra, "
            f"e.g. pip install 'serve-core[{name_or_executor}]'"
        ) from exc
    taken = {key: value for key, value in (options or {}).items() if key in entry.options}
    return getattr(module, class_name)(**taken)  # type: ignore[no-any-return, unused-ignore]


class ExecutorPool:
    """The executors of one ``Serve`` instance, built by name on first use.

    Args:
        default: the instance's executor (a name or an object).
        options: ``Serve``-level executor options (today ``ray_init_kwargs``).
    """

    def __init__(self, default: str | Executor, options: dict[str, Any]) -> None:
        self._options = {key: value for key, value in options.items() if value is not None}
        executor = create_executor(default, self._options)
        self.default = executor.name
        self._executors: dict[str, Executor] = {executor.name: executor}

    def unused_options(self) -> list[str]:
        """Options given that the default executor does not take."""
        entry = EXECUTORS.get(self.default)
        taken = entry.options if entry is not None else ()
        return sorted(key for key in self._options if key not in taken)

    def get(self, name: str | None) -> Executor:
        """The executor named ``name`` (``None``: the default), built now if needed."""
        name = name or self.default
        executor = self._executors.get(name)
        if executor is None:
            executor = self._executors[name] = create_executor(name, self._options)
        return executor

    def shutdown(self) -> None:
        for executor in self._executors.values():
            executor.shutdown()

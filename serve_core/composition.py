"""Composition: handles as values, what they bind to, and the chain of a composed call.

A :class:`~serve_core.handle.ServeHandle` pickles as its endpoint, options and the id of its
instance, never the instance itself, so it can be an init argument on every executor and be
stored in a durable store. An unpickled handle binds when it is first called (:func:`bind`):

1. inside a replica (a call, or the backend's constructor), to that replica's instance;
2. else to the instance of that id living in this process (a process-executor worker
   registers its link to the parent under the parent's id);
3. else to the default instance (``serve.init()``).

A replica reaches its instance through a :class:`Link`: the ``Serve`` itself on the inline
and thread executors, the worker's pipe to its parent on the process executor, a gateway
actor on Ray (``docs/composition.md``). Every link ends in the instance's router, so a
composed call keeps its SLO, ``method_name`` and ``shard_key``, is queued by deadline and
counted in the metrics like any other.

The chain: each call a replica runs may carry an :class:`Origin` (its deadline and the
backends whose calls wait upstream of it). A call made inside it inherits the earlier of its
own deadline and the caller's, and its chain is the caller's plus the caller's backend. A
backend whose every slot is held by calls of that chain can never run the new call while they
wait for it: it is refused at once with :class:`~serve_core.errors.LoopBackError`.

The process-wide state here is one :class:`_Directory` (the instances living in this process,
weakly, by id), the counterpart of the default instance of :mod:`serve_core.api`.
"""

from __future__ import annotations

import contextvars
import dataclasses
import threading
import weakref
from typing import TYPE_CHECKING, Any, Protocol

from .errors import LoopBackError, ServeStateError
from .queues import NO_DEADLINE

if TYPE_CHECKING:
    from .executors.base import Call
    from .handle import ServeHandle
    from .queues import ServeFuture
    from .slo import SLO


@dataclasses.dataclass(frozen=True, slots=True)
class Origin:
    """Where a call comes from: the caller's deadline (the instance's monotonic clock) and chain.

    ``chain`` lists the backend tags whose calls wait for this one, outermost first, one entry
    per slot held (a backend that appears twice holds two of its slots in the chain).
    """

    deadline: float = NO_DEADLINE
    chain: tuple[str, ...] = ()

    def __reduce__(self) -> tuple[Any, ...]:
        return Origin, (self.deadline, self.chain)


class Link(Protocol):
    """How handles inside a replica reach its instance's router."""

    @property
    def instance_id(self) -> str: ...

    def enqueue(
        self,
        endpoint_name: str,
        *,
        kwargs: dict[str, Any] | None = None,
        method_name: str = "__call__",
        slo: SLO = ...,
        shard_key: str | None = None,
        stream: bool = False,
        origin: Origin | None = None,
    ) -> ServeFuture: ...


@dataclasses.dataclass(frozen=True)
class ReplicaScope:
    """What a replica's code is part of: its instance's link and its backend."""

    link: Link
    backend_tag: str

    def origin(self, call: Call | None) -> Origin:
        """The origin of a call made by this replica's code while it runs ``call`` (None: its constructor)."""
        upstream = call.origin if call is not None else None
        if upstream is None:
            return Origin(NO_DEADLINE, (self.backend_tag,))
        return Origin(upstream.deadline, (*upstream.chain, self.backend_tag))

    def get_handle(
        self, endpoint_name: str, relative_slo_ms: float | None, absolute_slo_ms: float | None, missing_ok: bool
    ) -> ServeHandle:
        """``serve.get_handle`` inside the replica: a handle to an endpoint of its instance.

        In this process the instance checks the endpoint exists (unless ``missing_ok``); over
        a link to another process it is checked when called (an unknown endpoint's calls wait
        for it, as with ``missing_ok=True``, up to the instance's ``pending_timeout_s``).
        """
        get_handle = getattr(self.link, "get_handle", None)
        if get_handle is not None:
            handle: ServeHandle = get_handle(endpoint_name, relative_slo_ms, absolute_slo_ms, missing_ok)
            return handle
        from .handle import ServeHandle
        from .slo import SLO

        return ServeHandle(self.link, endpoint_name, slo=SLO.parse(relative_slo_ms, absolute_slo_ms))


def check_chain(backend_tag: str, chain: tuple[str, ...], replicas: int, per_replica: int) -> None:
    """Refuse a call to ``backend_tag`` whose ``chain`` holds every slot it can have.

    Args:
        backend_tag: the backend the call was routed to.
        chain: the call's chain (:attr:`Origin.chain`).
        replicas: the most replicas the backend keeps (``num_replicas``, or autoscaling's ``max_replicas``).
        per_replica: calls one replica runs at once (``max_concurrent_queries``; 1 for a replica that runs
            what it holds one after the other, ``executors.base.SERIAL_ATTRIBUTE``).

    Raises:
        LoopBackError: those calls wait for this one, so it could never start.
    """
    held = chain.count(backend_tag)
    if held < replicas * per_replica:
        return
    raise LoopBackError(
        f"the call to backend {backend_tag!r} made in the chain {' -> '.join(chain)} can never run: its "
        f"{held} call(s) in that chain hold every slot it has ({replicas} replica(s) x {per_replica}) and "
        "wait for this one; raise max_concurrent_queries or num_replicas, or do not wait on the call "
        "(docs/composition.md)"
    )


_scope: contextvars.ContextVar[tuple[ReplicaScope, Call | None] | None] = contextvars.ContextVar(
    "serve_replica_scope", default=None
)


def current_scope() -> tuple[ReplicaScope, Call | None] | None:
    """The replica scope and call the running code is part of, or None outside replicas."""
    return _scope.get()


def enter_call(scope: ReplicaScope, call: Call) -> contextvars.Token[Any]:
    """Run what follows as part of ``scope``'s call ``call`` (until :func:`leave_call`): the hot-path form of
    :class:`entered`."""
    return _scope.set((scope, call))


def leave_call(token: contextvars.Token[Any]) -> None:
    _scope.reset(token)


class entered:
    """Run the enclosed code as part of ``scope`` (and ``call``: None while the backend is built)."""

    __slots__ = ("_value", "_token")

    def __init__(self, scope: ReplicaScope | None, call: Call | None = None) -> None:
        self._value = None if scope is None else (scope, call)

    def __enter__(self) -> None:
        self._token = _scope.set(self._value) if self._value is not None else None

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _scope.reset(self._token)


class _Directory:
    """The instances (and worker links) of this process, by instance id, held weakly."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._links: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        self.worker_scope: ReplicaScope | None = None  # in a process-executor worker: its replica's

    def add(self, link: Link) -> None:
        with self._lock:
            self._links[link.instance_id] = link

    def remove(self, link: Link) -> None:
        with self._lock:
            if self._links.get(link.instance_id) is link:
                del self._links[link.instance_id]

    def get(self, instance_id: str) -> Link | None:
        with self._lock:
            found: Link | None = self._links.get(instance_id)
            return found


directory = _Directory()


def register(link: Link) -> None:
    """Make ``link`` what handles of its instance id unpickled in this process bind to."""
    directory.add(link)


def unregister(link: Link) -> None:
    directory.remove(link)


def enter_worker(scope: ReplicaScope) -> None:
    """In a worker process: its replica's scope, for threads the backend starts (outside any call)."""
    directory.worker_scope = scope
    directory.add(scope.link)


def ambient_scope() -> ReplicaScope | None:
    """The replica scope of the running code, or of this worker process; None in a plain process."""
    scoped = _scope.get()
    return scoped[0] if scoped is not None else directory.worker_scope


def bind(instance_id: str, endpoint_name: str) -> Link:
    """What an unpickled handle of ``instance_id`` sends its calls to (see the module docstring).

    Raises:
        ServeStateError: no replica scope, no such instance in this process and no default instance.
    """
    scope = ambient_scope()
    if scope is not None:
        return scope.link
    link = directory.get(instance_id)
    if link is not None:
        return link
    from . import api  # lazy: api imports the Serve class, which imports handles

    default = api.default_instance()
    if default is not None:
        return default
    raise ServeStateError(
        f"the handle to endpoint {endpoint_name!r} of instance {instance_id!r} was unpickled in a process "
        "where that instance does not run and no instance was started (serve_core.init()); use it inside "
        "a replica, or where its instance runs"
    )

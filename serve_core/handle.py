"""``ServeHandle``: calling an endpoint from Python.

A handle is a value: it pickles as its instance's id, its endpoint and its options (never
the instance), so it can be a backend's init argument on every executor and be stored in a
durable store; where an unpickled handle sends its calls is decided by
:func:`serve_core.composition.bind`. A call made inside a replica of the handle's instance is
a composed call: it inherits the caller's deadline and chain (:mod:`serve_core.composition`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from .composition import Link, bind, current_scope
from .errors import ServeStateError, ServeTypeError, ValidationError
from .queues import ServeFuture
from .slo import NO_SLO, SLO
from .streams import ServeStream

if TYPE_CHECKING:
    from .serve import Serve

_UNSET: Any = object()
_Handle = TypeVar("_Handle", bound="ServeHandle")


class ServeHandle:
    """A handle to an endpoint; ``remote(**kwargs)`` enqueues a call.

    Handles are cheap, immutable values: :meth:`options` returns a new handle. They pickle
    (and copy) without their instance; see the module docstring.
    """

    __slots__ = ("_link", "_instance_id", "endpoint_name", "method_name", "slo", "shard_key")

    def __init__(
        self,
        serve: Link | None,
        endpoint_name: str,
        *,
        method_name: str = "__call__",
        slo: SLO = NO_SLO,
        shard_key: str | None = None,
        instance_id: str | None = None,
    ) -> None:
        self._link = serve  # None: unpickled, bound on first use
        self._instance_id = serve.instance_id if serve is not None else instance_id or ""
        self.endpoint_name = endpoint_name
        self.method_name = method_name
        self.slo = slo
        self.shard_key = shard_key

    @property
    def instance_id(self) -> str:
        """The id of the instance this handle was made by."""
        return self._instance_id

    def __reduce__(self) -> tuple[Any, ...]:
        streaming = isinstance(self, StreamingHandle)
        return _unpickled, (
            self._instance_id, self.endpoint_name, self.method_name, self.slo, self.shard_key, streaming
        )

    def __copy__(self) -> ServeHandle:
        return self  # immutable

    def __deepcopy__(self, memo: dict[int, Any]) -> ServeHandle:
        return self

    def remote(self, *args: Any, **kwargs: Any) -> ServeFuture:
        """Call the endpoint with keyword arguments.

        Returns:
            A ``concurrent.futures.Future`` (also awaitable) of the backend's result.

        Raises:
            ServeTypeError: positional arguments were given.
            BackPressureError: the backend's queue is full.
        """
        if args:
            raise ServeTypeError(
                "handle.remote() takes keyword arguments only, e.g. handle.remote(x=1)"
            )
        return self._enqueue(kwargs, False)

    def _enqueue(self, kwargs: dict[str, Any], stream: bool) -> ServeFuture:
        """Enqueue on the handle's instance; inside a replica of it, as a composed call."""
        extra: dict[str, Any] = {"stream": True} if stream else {}
        link = self._link
        scoped = current_scope()
        if scoped is not None:  # inside a replica: a composed call, if it goes to the replica's instance
            scope, call = scoped
            if link is None or link.instance_id == scope.link.instance_id:
                return scope.link.enqueue(
                    self.endpoint_name, kwargs=kwargs, method_name=self.method_name, slo=self.slo,
                    shard_key=self.shard_key, origin=scope.origin(call), **extra,
                )
        if link is None:
            link = self._link = bind(self._instance_id, self.endpoint_name)
        return link.enqueue(
            self.endpoint_name, kwargs=kwargs, method_name=self.method_name, slo=self.slo,
            shard_key=self.shard_key, **extra,
        )

    @overload
    def options(
        self,
        method_name: str | None = None,
        relative_slo_ms: float | None = None,
        absolute_slo_ms: float | None = None,
        shard_key: str | None = _UNSET,
        *,
        stream: Literal[True],
    ) -> StreamingHandle: ...

    @overload
    def options(
        self,
        method_name: str | None = None,
        relative_slo_ms: float | None = None,
        absolute_slo_ms: float | None = None,
        shard_key: str | None = _UNSET,
        *,
        stream: Literal[False],
    ) -> ServeHandle: ...

    @overload
    def options(
        self: _Handle,
        method_name: str | None = None,
        relative_slo_ms: float | None = None,
        absolute_slo_ms: float | None = None,
        shard_key: str | None = _UNSET,
    ) -> _Handle: ...

    @overload
    def options(
        self,
        method_name: str | None = None,
        relative_slo_ms: float | None = None,
        absolute_slo_ms: float | None = None,
        shard_key: str | None = _UNSET,
        *,
        stream: bool | None = None,
    ) -> ServeHandle: ...

    def options(
        self,
        method_name: str | None = None,
        relative_slo_ms: float | None = None,
        absolute_slo_ms: float | None = None,
        shard_key: str | None = _UNSET,
        *,
        stream: bool | None = None,
    ) -> ServeHandle:
        """A new handle; options not given are inherited from this one.

        Giving either SLO replaces this handle's SLO. ``stream=True`` makes a
        :class:`StreamingHandle`, whose ``remote()`` returns a :class:`~serve_core.streams.ServeStream`
        of the items of a generator backend (docs/streaming.md); ``stream=False`` a plain one again.
        """
        if method_name is not None and (not isinstance(method_name, str) or not method_name):
            raise ValidationError(f"method_name must be a non-empty string, got {method_name!r}")
        if shard_key is not _UNSET and shard_key is not None and not isinstance(shard_key, str):
            raise ServeTypeError(f"shard_key must be a string, got {type(shard_key).__name__}")
        if relative_slo_ms is None and absolute_slo_ms is None:
            slo = self.slo
        else:
            slo = SLO.parse(relative_slo_ms, absolute_slo_ms)
        streaming = isinstance(self, StreamingHandle) if stream is None else stream
        return (StreamingHandle if streaming else ServeHandle)(
            self._link,
            self.endpoint_name,
            method_name=method_name if method_name is not None else self.method_name,
            slo=slo,
            shard_key=self.shard_key if shard_key is _UNSET else shard_key,
            instance_id=self._instance_id,
        )

    def get_traffic_policy(self) -> dict[str, float]:
        """The endpoint's current ``{backend_tag: weight}``."""
        return self._serve_here().get_traffic_policy(self.endpoint_name)

    def scale(self, num_replicas: int, backend_tag: str | None = None) -> None:
        """Set ``num_replicas`` of the endpoint's backend (the only one, or ``backend_tag``)."""
        self._edit_config(backend_tag, num_replicas=num_replicas)

    def set_max_batch_size(self, max_batch_size: int | None, backend_tag: str | None = None) -> None:
        """Set ``max_batch_size`` of the endpoint's backend (the only one, or ``backend_tag``)."""
        self._edit_config(backend_tag, max_batch_size=max_batch_size)

    def _edit_config(self, backend_tag: str | None, **changes: Any) -> None:
        traffic = self.get_traffic_policy()
        if backend_tag is None:
            if len(traffic) != 1:
                raise ValidationError(
                    f"endpoint {self.endpoint_name!r} has backends {sorted(traffic)}; name backend_tag"
                )
            (backend_tag,) = traffic
        elif backend_tag not in traffic:
            raise ValidationError(f"backend {backend_tag!r} gets no traffic from {self.endpoint_name!r}")
        serve = self._serve_here()
        config = serve.get_backend_config(backend_tag)
        serve.set_backend_config(backend_tag, config.copy(**changes))

    def _serve_here(self) -> Serve:
        """The instance itself, for the methods that read or change its registry."""
        from .serve import Serve  # lazy: serve imports this module

        link = self._link if self._link is not None else bind(self._instance_id, self.endpoint_name)
        if not isinstance(link, Serve):
            raise ServeStateError(
                f"the handle to endpoint {self.endpoint_name!r} reaches its instance from another process: "
                "only remote() and options() work here (traffic and configs are read and changed where it runs)"
            )
        return link

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(endpoint={self.endpoint_name!r}, method={self.method_name!r}, "
            f"slo={self.slo}, shard_key={self.shard_key!r})"
        )


class StreamingHandle(ServeHandle):
    """A handle whose calls stream: ``handle.options(stream=True)``."""

    __slots__ = ()

    def remote(self, *args: Any, **kwargs: Any) -> ServeStream:  # type: ignore[override]
        """Call the endpoint with keyword arguments; the items come as the backend yields them.

        Returns:
            A :class:`~serve_core.streams.ServeStream`: iterate it, or ``async for`` over it.
            A backend that does not return a generator gives its result as the one item.

        Raises:
            ServeTypeError: positional arguments were given.
            BackPressureError: the backend's queue is full.
        """
        if args:
            raise ServeTypeError(
                "handle.remote() takes keyword arguments only, e.g. handle.remote(x=1)"
            )
        return ServeStream(self._enqueue(kwargs, True))


def _unpickled(
    instance_id: str, endpoint_name: str, method_name: str, slo: SLO, shard_key: str | None, stream: bool = False
) -> ServeHandle:
    """A handle as unpickled: bound when first called (:func:`serve_core.composition.bind`)."""
    return (StreamingHandle if stream else ServeHandle)(
        None, endpoint_name, method_name=method_name, slo=slo, shard_key=shard_key, instance_id=instance_id
    )

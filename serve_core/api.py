"""The module-level API (``serve.init``, ``serve.link``…) bound to a default instance.

The default instance is created by :func:`init` and cleared by :func:`shutdown`; it is
the only process-wide state, held by one ``_Default`` object. Every other function
has the signature of the :class:`Serve` method of the same name and forwards to it
(tests/test_typed_api.py keeps the two in step).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from .composition import ambient_scope
from .errors import ServeStateError, ShuttingDownError
from .policy import RoutePolicy
from .serve import (
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_HEARTBEAT_S,
    DEFAULT_HTTP_REQUEST_TIMEOUT_S,
    DEFAULT_INSTANCE_EXPIRY_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_PENDING_PER_ENDPOINT,
    DEFAULT_PENDING_TIMEOUT_S,
    DEFAULT_REGISTRY_POLL_S,
    Serve,
    warn_if_different,
)

if TYPE_CHECKING:
    import random

    from .clock import Clock
    from .config import BackendConfig
    from .executors.base import Executor
    from .handle import ServeHandle
    from .http.app import ServeApp
    from .policy import PolicySpec
    from .prom import MetricsConfig

F = TypeVar("F", bound=Callable[..., Any])


class _Default:
    """Holds the default ``Serve`` instance."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.instance: Serve | None = None

    def get(self) -> Serve:
        instance = self.instance
        if instance is not None and instance.state == "draining":
            raise ShuttingDownError("serve_core is shutting down; no new calls or changes")
        if instance is None or not instance.running:
            raise ServeStateError("serve_core is not initialised; call serve_core.init() first")
        return instance


_default = _Default()


def default_instance() -> Serve | None:
    """The default instance while it runs, else None (what an unpickled handle binds to last)."""
    instance = _default.instance
    return instance if instance is not None and instance.running else None


# ------------------------------------------------------------------ lifecycle
def init(
    kv_store_connector: Callable[[str], Any] | None = None,
    kv_store_path: str | None = None,
    blocking: bool = False,
    start_server: bool = True,
    http_host: str = "127.0.0.1",
    http_port: int = 8000,
    ray_init_kwargs: dict[str, Any] | None = None,
    gc_window_seconds: float = 3600,
    queueing_policy: PolicySpec | str = RoutePolicy.Random,
    policy_kwargs: dict[str, Any] | None = None,
    executor: str | Executor = "thread",
    *,
    clock: Clock | None = None,
    rng: random.Random | None = None,
    max_pending_per_endpoint: int = DEFAULT_MAX_PENDING_PER_ENDPOINT,
    pending_timeout_s: float = DEFAULT_PENDING_TIMEOUT_S,
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    http_request_timeout_s: float | None = DEFAULT_HTTP_REQUEST_TIMEOUT_S,
    debug: bool = False,
    dashboard: bool | None = None,
    registry_poll_s: float = DEFAULT_REGISTRY_POLL_S,
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    instance_expiry_s: float = DEFAULT_INSTANCE_EXPIRY_S,
    run_replicas: bool = True,
    metrics: bool | MetricsConfig = True,
    allow_unsigned_store: bool = False,
) -> Serve:
    """Start the default instance (see :class:`Serve` for the arguments).

    Idempotent: a second call returns the running instance and warns if its
    arguments differ.
    """
    kwargs = dict(locals())
    with _default.lock:
        running = _default.instance
        if running is not None and running.running:
            warn_if_different(running, _non_defaults(kwargs))
            return running
        if running is not None and running.state == "draining":
            raise ShuttingDownError("serve_core is shutting down; call init() again once shutdown() has returned")
        _default.instance = Serve(**kwargs)
        return _default.instance


def _non_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of an ``init`` call that differ from its defaults.

    They stand for the arguments the caller gave: a bare ``init()`` next to a running
    instance must not warn about the defaults it never asked for. (A default passed
    explicitly is not told apart from one left out.)
    """
    parameters = inspect.signature(init).parameters
    return {name: value for name, value in kwargs.items() if value != parameters[name].default}


def shutdown() -> None:
    """Drain and stop the default instance, if any (see :meth:`Serve.shutdown`). Idempotent.

    The instance stays the default while it drains: module-level calls meanwhile raise
    ``ShuttingDownError``, and ``init()`` starts a new instance only once it has stopped.
    """
    instance = _default.instance
    if instance is not None:
        instance.shutdown()
    with _default.lock:
        if _default.instance is instance:
            _default.instance = None


# ------------------------------------------------------------------ endpoints
def create_endpoint(endpoint_name: str, route: str | None = None, methods: Iterable[str] = ("GET",)) -> None:
    """Register an endpoint; ``route=None`` makes it reachable from Python only.

    Raises:
        ValidationError: bad name, route or method. ConflictError: name or route taken.
    """
    _default.get().create_endpoint(endpoint_name, route, methods)


# ------------------------------------------------------------------- backends
def create_backend(
    func_or_class: Any,
    backend_tag: str,
    *actor_init_args: Any,
    backend_config: BackendConfig | None = None,
    replace: bool = False,
) -> None:
    """Register a backend and start its replicas; returns when they are ready.

    The same code under a tag the store already holds is a no-op that keeps the stored
    config (an operator may have scaled it). ``replace=True`` replaces different code under
    that tag on every instance (keeping its config unless ``backend_config`` is given).

    Raises:
        ServeTypeError: not a function or class. BatchAnnotationError: batching on a
        backend without ``@accept_batch``. ConflictError: tag defined differently.
    """
    _default.get().create_backend(
        func_or_class, backend_tag, *actor_init_args, backend_config=backend_config, replace=replace
    )


def get_backend_config(backend_tag: str) -> BackendConfig:
    """A detached copy of the backend's config (as the store holds it)."""
    return _default.get().get_backend_config(backend_tag)


def set_backend_config(backend_tag: str, backend_config: BackendConfig) -> None:
    """Apply a config live, on every instance: replica count, batching, queue bound, placement.

    It is applied here first: if a replica fails to start, the old config stays in force
    (and in the store) and the error is raised.
    """
    _default.get().set_backend_config(backend_tag, backend_config)


# -------------------------------------------------------------------- traffic
def link(endpoint_name: str, backend_tag: str) -> None:
    """Send all of the endpoint's traffic to one backend."""
    _default.get().link(endpoint_name, backend_tag)


def split(endpoint_name: str, traffic_policy_dictionary: dict[str, float]) -> None:
    """Split the endpoint's traffic by weight, on every instance; invalid input changes nothing."""
    _default.get().split(endpoint_name, traffic_policy_dictionary)


def get_traffic_policy(endpoint_name: str) -> dict[str, float]:
    """The endpoint's ``{backend_tag: weight}``."""
    return _default.get().get_traffic_policy(endpoint_name)


# -------------------------------------------------------------------- calling
def get_handle(
    endpoint_name: str,
    relative_slo_ms: float | None = None,
    absolute_slo_ms: float | None = None,
    missing_ok: bool = False,
) -> ServeHandle:
    """A handle to call the endpoint from Python.

    With ``missing_ok=True`` the endpoint need not exist yet; calls wait (bounded
    by ``max_pending_per_endpoint`` and ``pending_timeout_s``) until it has traffic.
    """
    scope = ambient_scope()  # inside a replica: its own instance's endpoint (docs/composition.md)
    if scope is not None:
        return scope.get_handle(endpoint_name, relative_slo_ms, absolute_slo_ms, missing_ok)
    return _default.get().get_handle(endpoint_name, relative_slo_ms, absolute_slo_ms, missing_ok)


class route:
    """Decorator: ``@serve.route("/path")`` creates backend ``<name>:v0`` and endpoint
    ``<name>`` at the route, links them and returns the endpoint's handle."""

    def __init__(self, url_route: str) -> None:
        self.url_route = url_route

    def __call__(self, func_or_class: Any) -> ServeHandle:
        return _default.get().route(self.url_route)(func_or_class)


def accept_batch(func: F) -> F:
    """Mark a function or ``__call__`` as taking batches (lists of arguments)."""
    func._serve_accept_batch = True  # type: ignore[attr-defined]
    return func


# ----------------------------------------------------------------------- http
def wsgi_app() -> ServeApp:
    """This instance's WSGI application; mount it in any WSGI server or app."""
    return _default.get().wsgi_app()


def http_address() -> tuple[str, int] | None:
    """``(host, port)`` of the standalone HTTP server, or None when it is not running."""
    return _default.get().http_address()


# -------------------------------------------------------------------- metrics
def stat(
    percentiles: Sequence[float] = (50, 90, 95),
    agg_windows_seconds: Sequence[float] = (10, 60, 300, 600, 3600),
) -> dict[str, float]:
    """Flat metrics: ``<backend>_error_counter``, ``<backend>_latency_s_<p>th_perc_<w>_window``…

    Raises:
        ValidationError: a window longer than ``gc_window_seconds``, or bad numbers.
    """
    return _default.get().stat(percentiles, agg_windows_seconds)

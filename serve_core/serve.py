"""``Serve``: one serving instance — composition, validation against the registry, persistence.

A ``Serve`` is running once constructed. :meth:`Serve.shutdown` (or leaving its
``with`` block) drains it: no new calls, what is queued and in flight is served for up
to ``drain_timeout_s``, then the rest fails and everything stops. Several instances can
live side by side in one process; the module-level API of ``serve_core`` forwards to a
default one. Each backend's running state is its :class:`~serve_core.runtime.BackendRuntime`;
the :class:`~serve_core.router.Router` admits queries from endpoints to them.
"""

from __future__ import annotations

import enum
import logging
import math
import random
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from .clock import Clock, SystemClock, wait_for
from .config import BackendConfig
from .errors import NotFoundError, ServeStateError, ShuttingDownError, ValidationError
from .executors.base import Executor, ExecutorPool, Replica
from .handle import ServeHandle
from .metrics import check_stat_args
from .persistence import RestoreReport, open_registry_store, restore
from .policy import PolicySpec, RoutePolicy
from .queues import NO_DEADLINE, Query, ServeFuture
from .registry import Registry
from .router import Router
from .runtime import BackendRuntime
from .slo import NO_SLO, SLO
from .split import Traffic

if TYPE_CHECKING:
    from .http.app import ServeApp
    from .http.server import HTTPServer

log = logging.getLogger("serve_core")

DEFAULT_MAX_PENDING_PER_ENDPOINT = 1_000
DEFAULT_PENDING_TIMEOUT_S = 30.0
DEFAULT_DRAIN_TIMEOUT_S = 30.0
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024  # largest HTTP request body (413 past it)
DEFAULT_HTTP_REQUEST_TIMEOUT_S = 300.0  # how long an HTTP request waits for its answer (504 past it)
HTTP_READY_TIMEOUT_S = 10.0
STOP_GRACE_S = 30.0  # beyond two drain times, how long a second shutdown() waits for the first


class State(enum.Enum):
    RUNNING = "running"
    DRAINING = "draining"  # shutdown() under way: no new calls, queued ones still served
    STOPPED = "stopped"


class Serve:
    """A serving instance. Takes the same keyword arguments as :func:`serve_core.init`.

    Extra keyword-only arguments (not in the original API):
        clock: time source and timers (tests pass a :class:`serve_core.testing.FakeClock`).
        rng: random source of the routing policies (tests pass a seeded one).
        max_pending_per_endpoint: queries that may wait for an endpoint without traffic.
        pending_timeout_s: how long such a query waits before ``DeadlineExceededError``.
        drain_timeout_s: how long scale-down and shutdown wait for queued and running calls.
        max_body_bytes: largest HTTP request body accepted (413 past it).
        http_request_timeout_s: how long an HTTP request waits for its answer before a 504
            (a query still queued is withdrawn); ``None`` waits as long as it takes.
        debug: put tracebacks in HTTP 500 bodies (for development only).

    The registry is kept in the store named by ``kv_store_connector`` / ``kv_store_path``
    (memory when neither is given) and restored from it here; ``restored`` is the
    :class:`~serve_core.persistence.RestoreReport` of what came back (see docs/kv.md).
    """

    def __init__(
        self,
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
    ) -> None:
        self.init_kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        check_stat_args((), (), gc_window_seconds)
        _check_options(max_body_bytes, http_request_timeout_s, drain_timeout_s)
        self._own_clock = SystemClock() if clock is None else None
        self.clock: Clock = clock or self._own_clock  # type: ignore[assignment]
        self.gc_window_seconds = gc_window_seconds
        self.start_server = start_server
        self.max_body_bytes, self.debug = max_body_bytes, debug
        self.http_request_timeout_s = http_request_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self._registry = Registry()
        self._runtimes: dict[str, BackendRuntime] = {}
        self._admin = threading.RLock()  # serialises registry changes, scaling and shutdown
        self._router = self._build_router(
            queueing_policy, dict(policy_kwargs or {}), rng, max_pending_per_endpoint, pending_timeout_s
        )
        self._executors = ExecutorPool(executor, {"ray_init_kwargs": ray_init_kwargs})
        for option in self._executors.unused_options():
            log.warning(
                "%s are only used by the ray executor; the default executor %r ignores them "
                "(backends with BackendConfig(executor='ray') still use them)",
                option, self._executors.default,
            )
        self._app: Any = None
        self._http: HTTPServer | None = None
        self._state = State.RUNNING
        self._stopped = threading.Event()
        try:
            self._store = open_registry_store(kv_store_path, kv_store_connector)
        except BaseException:
            self._stop(())
            raise
        self.restored: RestoreReport = self._restore()
        if start_server:
            self._start_http(http_host, http_port, blocking)

    def _build_router(
        self,
        queueing_policy: PolicySpec | str,
        policy_kwargs: dict[str, Any],
        rng: random.Random | None,
        max_pending_per_endpoint: int,
        pending_timeout_s: float,
    ) -> Router:
        policy = RoutePolicy.resolve(queueing_policy)
        policy.build(Traffic.of({"-": 1.0}), random.Random(), policy_kwargs)  # validates the kwargs now
        return Router(
            clock=self.clock,
            policy=policy,
            policy_kwargs=policy_kwargs,
            rng=rng or random.Random(),
            max_pending_per_endpoint=max_pending_per_endpoint,
            pending_timeout_s=pending_timeout_s,
        )

    # ------------------------------------------------------------ lifecycle
    @property
    def running(self) -> bool:
        return self._state is State.RUNNING

    @property
    def state(self) -> str:
        """``"running"``, ``"draining"`` (inside :meth:`shutdown`) or ``"stopped"``."""
        return self._state.value

    def _restore(self) -> RestoreReport:
        try:
            return restore(self, self._store)
        except BaseException:
            self.shutdown()
            raise

    def _check_running(self) -> None:
        if self._state is State.DRAINING:
            raise ShuttingDownError("this serve instance is shutting down; no new calls or changes")
        if self._state is not State.RUNNING:
            raise ServeStateError("this serve instance was shut down; create a new one")

    def shutdown(self) -> None:
        """Drain, then stop. Idempotent.

        New calls are refused at once (``ShuttingDownError``, HTTP 503); what is queued
        and in flight is served for up to ``drain_timeout_s``; what is left then fails
        with ``ShuttingDownError``; then replicas, HTTP server and store stop.
        """
        with self._admin:
            first = self._state is State.RUNNING
            self._state = State.DRAINING if first else self._state
            runtimes = list(self._runtimes.values())
        if not first:  # another thread is shutting it down: return once it has stopped
            self._stopped.wait(2 * self.drain_timeout_s + STOP_GRACE_S)
            return
        self._router.close()
        for runtime in runtimes:
            runtime.stop_admitting()
        started, real_start = self.clock.monotonic(), time.monotonic()
        self._drain(runtimes)
        spent = max(self.clock.monotonic() - started, time.monotonic() - real_start)
        self._stop(runtimes, max(0.0, self.drain_timeout_s - spent))

    def _drain(self, runtimes: list[BackendRuntime]) -> None:
        """Wait until every runtime is idle, or ``drain_timeout_s`` has passed."""
        if not runtimes:
            return
        all_idle: Future[None] = Future()
        remaining = [len(runtimes)]
        lock = threading.Lock()

        def one_idle() -> None:
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    all_idle.set_result(None)

        for runtime in runtimes:
            runtime.when_idle(one_idle)
        if not wait_for(self.clock, all_idle, self.drain_timeout_s):
            log.warning("shutdown: calls still queued or running after %s s; failing them", self.drain_timeout_s)

    def _stop(self, runtimes: Iterable[BackendRuntime], stop_timeout: float = 0.0) -> None:
        with self._admin:
            self._state = State.STOPPED
        for runtime in runtimes:
            runtime.close(stop_timeout)
        self._executors.shutdown()
        if self._http is not None:
            self._http.close()
        store = getattr(self, "_store", None)
        if store is not None:
            store.close()
        if self._own_clock is not None:
            self._own_clock.close()
        self._stopped.set()

    def __enter__(self) -> Serve:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    # ------------------------------------------------------------ endpoints
    def create_endpoint(
        self, endpoint_name: str, route: str | None = None, methods: Iterable[str] = ("GET",)
    ) -> None:
        """Register an endpoint; ``route=None`` makes it reachable from Python only.

        Raises:
            ValidationError: bad name, route or method. ConflictError: name or route taken.
        """
        with self._admin:
            self._check_running()
            info = self._registry.check_endpoint(endpoint_name, route, methods)
            if info is not None:
                self._store.save_endpoint(info)  # written first: a failed write changes nothing
                self._registry.add_endpoint(info)

    # ------------------------------------------------------------- backends
    def create_backend(
        self,
        func_or_class: Any,
        backend_tag: str,
        *actor_init_args: Any,
        backend_config: BackendConfig | None = None,
    ) -> None:
        """Register a backend and start its replicas; returns when they are ready.

        Raises:
            ServeTypeError: not a function or class. BatchAnnotationError: batching on a
            backend without ``@accept_batch``. ConflictError: tag defined differently.
        """
        with self._admin:
            self._check_running()
            info, config = self._registry.check_backend(func_or_class, backend_tag, actor_init_args, backend_config)
            existing = self._runtimes.get(info.tag)
            if existing is not None:
                # Identical code: a no-op that keeps the live config, so a deployment script can
                # run again after a restart (or after an operator scaled the backend).
                if existing.config != config:
                    log.warning(
                        "backend %r already exists with identical code; keeping its live config "
                        "(use set_backend_config to change it)",
                        info.tag,
                    )
                return
            record = self._store.encode_backend(info, config)  # fails before any replica starts
            runtime = BackendRuntime(
                info,
                config,
                executors=self._executors,
                clock=self.clock,
                gc_window_seconds=self.gc_window_seconds,
                drain_timeout_s=self.drain_timeout_s,
                count_error=self._router.count_error,
            )
            runtime.start()
            try:  # written once the replicas are up, before the backend is visible
                self._store.save_backend(record)
            except BaseException:
                runtime.close(0)
                raise
            self._runtimes[info.tag] = runtime
            self._router.add_backend(runtime)
            self._registry.add_backend(info)

    def _runtime(self, backend_tag: str) -> BackendRuntime:
        runtime = self._runtimes.get(backend_tag)
        if runtime is None:
            raise NotFoundError(f"backend {backend_tag!r} is not registered; create it with create_backend")
        return runtime

    def get_backend_config(self, backend_tag: str) -> BackendConfig:
        """A detached copy of the backend's config."""
        return self._runtime(backend_tag).config.copy()

    def set_backend_config(self, backend_tag: str, backend_config: BackendConfig) -> None:
        """Apply a config live: replica count, batching, queue bound, placement.

        If a replica fails to start, the old config stays in force (and in the store)
        and the error is raised.
        """
        with self._admin:
            self._check_running()
            runtime = self._runtime(backend_tag)
            config = self._registry.check_config(self._registry.backend(backend_tag), backend_config)
            old = runtime.config
            self._store.save_config(backend_tag, config)  # written first: a failed write changes nothing
            try:
                runtime.reconfigure(config)
            except BaseException:
                self._store.save_config(backend_tag, old)
                raise

    def replicas(self, backend_tag: str) -> list[Replica]:
        """The backend's replicas in service, oldest first."""
        return self._runtime(backend_tag).replicas()

    def replica_ids(self, backend_tag: str) -> list[str]:
        """The ids of the backend's replicas in service, oldest first."""
        return [replica.replica_id for replica in self.replicas(backend_tag)]

    def executor(self, name: str | None = None) -> Executor:
        """The executor named ``name`` (``None``: the instance's default), built now if needed."""
        return self._executors.get(name)

    # -------------------------------------------------------------- traffic
    def link(self, endpoint_name: str, backend_tag: str) -> None:
        """Send all of the endpoint's traffic to one backend."""
        self.split(endpoint_name, {backend_tag: 1.0})

    def split(self, endpoint_name: str, traffic_policy_dictionary: dict[str, float]) -> None:
        """Split the endpoint's traffic by weight; invalid input changes nothing."""
        with self._admin:
            self._check_running()
            weights = self._registry.check_split(endpoint_name, traffic_policy_dictionary)
            self._store.save_traffic(endpoint_name, weights)
            self._registry.set_traffic(endpoint_name, weights)
            self._router.set_traffic(endpoint_name, weights)

    def route_table(self) -> dict[str, list[Any]]:
        """``{route: [endpoint, [methods]]}`` of the endpoints reachable over HTTP."""
        return self._registry.route_table()

    @property
    def routes_version(self) -> int:
        """A number that changes whenever :meth:`route_table` does."""
        return self._registry.routes_version

    def get_traffic_policy(self, endpoint_name: str) -> dict[str, float]:
        """The endpoint's ``{backend_tag: weight}``."""
        self._registry.endpoint(endpoint_name)
        traffic = self._registry.traffic.get(endpoint_name)
        if traffic is None:
            raise NotFoundError(f"endpoint {endpoint_name!r} has no traffic yet; link or split it")
        return dict(traffic)

    # -------------------------------------------------------------- calling
    def get_handle(
        self,
        endpoint_name: str,
        relative_slo_ms: float | None = None,
        absolute_slo_ms: float | None = None,
        missing_ok: bool = False,
    ) -> ServeHandle:
        """A handle to call the endpoint from Python.

        With ``missing_ok=True`` the endpoint need not exist yet; calls wait (bounded
        by ``max_pending_per_endpoint`` and ``pending_timeout_s``) until it has traffic.
        """
        self._check_running()
        if not missing_ok:
            self._registry.endpoint(endpoint_name)
        return ServeHandle(self, endpoint_name, slo=SLO.parse(relative_slo_ms, absolute_slo_ms))

    def enqueue(
        self,
        endpoint_name: str,
        *,
        kwargs: dict[str, Any] | None = None,
        request: Any = None,
        method_name: str = "__call__",
        slo: SLO = NO_SLO,
        shard_key: str | None = None,
    ) -> ServeFuture:
        """Call an endpoint: the one entry that handles and the HTTP front use.

        Args:
            endpoint_name: the endpoint to call (it may have no traffic yet).
            kwargs: the keyword arguments of a Python call.
            request: the web request of an HTTP call (``None`` for Python calls).
            method_name: the backend method to call.
            slo: the call's deadline (:meth:`SLO.parse`).
            shard_key: pins the call to one backend of a split while the weights stay.

        Returns:
            A future (also awaitable) of the backend's result.

        Raises:
            BackPressureError: the backend's queue is full. ServeStateError: the instance
            is shut down (``ShuttingDownError`` while it drains).
        """
        if self._state is not State.RUNNING:
            self._check_running()
        future = ServeFuture()
        arrival = self.clock.monotonic()
        deadline = NO_DEADLINE if slo is NO_SLO else slo.deadline(self.clock)
        self._router.submit(
            Query(endpoint_name, method_name, kwargs or {}, request, deadline, shard_key, future, arrival)
        )
        return future

    def route(self, url_route: str) -> Callable[[Any], ServeHandle]:
        """Decorator: backend ``<name>:v0``, endpoint ``<name>`` at ``url_route``, linked."""

        def decorator(func_or_class: Any) -> ServeHandle:
            name = func_or_class.__name__
            self.create_endpoint(name, url_route)  # first: a taken route leaves nothing behind
            self.create_backend(func_or_class, f"{name}:v0")
            self.link(name, f"{name}:v0")
            return self.get_handle(name)

        return decorator

    # ----------------------------------------------------------------- http
    def wsgi_app(self) -> ServeApp:
        """This instance's WSGI application; mount it in any WSGI server or app."""
        if self._app is None:
            from .http.app import ServeApp  # lazy: the core does not import Werkzeug

            self._app = ServeApp(
                self,
                max_body_bytes=self.max_body_bytes,
                request_timeout_s=self.http_request_timeout_s,
                debug=self.debug,
            )
        return self._app

    def http_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the standalone HTTP server, or None when it is not running."""
        return self._http.address if self._http is not None and self._state is not State.STOPPED else None

    def _start_http(self, host: str, port: int, blocking: bool) -> None:
        from .http.server import HTTPServer

        try:
            self._http = HTTPServer(self.wsgi_app(), host, port)
            if blocking:
                self._http.wait_ready(HTTP_READY_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise

    # -------------------------------------------------------------- metrics
    def stat(
        self,
        percentiles: Sequence[float] = (50, 90, 95),
        agg_windows_seconds: Sequence[float] = (10, 60, 300, 600, 3600),
    ) -> dict[str, float]:
        """Flat metrics: ``<backend>_error_counter``, ``<backend>_latency_s_<p>th_perc_<w>_window``…

        Raises:
            ValidationError: a window longer than ``gc_window_seconds``, or bad numbers.
        """
        pcts, windows = check_stat_args(percentiles, agg_windows_seconds, self.gc_window_seconds)
        return self._router.stat(pcts, windows)

    def __repr__(self) -> str:
        registry = self._registry
        return f"<Serve {self._state.value} endpoints={len(registry.endpoints)} backends={len(registry.backends)}>"


def _check_options(max_body_bytes: Any, http_request_timeout_s: Any, drain_timeout_s: Any) -> None:
    if isinstance(drain_timeout_s, bool) or not (
        isinstance(drain_timeout_s, (int, float)) and 0 <= drain_timeout_s < math.inf
    ):
        raise ValidationError(f"drain_timeout_s must be a number of seconds >= 0, got {drain_timeout_s!r}")
    if http_request_timeout_s is not None and not (
        isinstance(http_request_timeout_s, (int, float)) and 0 < http_request_timeout_s < math.inf
    ):
        raise ValidationError(
            f"http_request_timeout_s must be None or a positive number, got {http_request_timeout_s!r}"
        )
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValidationError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}")


def warn_if_different(running: Serve, requested: dict[str, Any]) -> None:
    """``init`` is idempotent: tell the caller when its arguments are ignored."""
    differing = sorted(k for k, v in requested.items() if running.init_kwargs.get(k) != v)
    if differing:
        warnings.warn(
            f"serve_core is already initialised; ignoring different arguments {differing} "
            "(call shutdown() first to re-initialise)",
            stacklevel=3,
        )

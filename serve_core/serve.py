"""``Serve``: one serving instance — composition, changes to the store's registry, convergence.

A ``Serve`` is running once constructed. :meth:`Serve.shutdown` (or leaving its
``with`` block) drains it: no new calls, what is queued and in flight is served for up
to ``drain_timeout_s``, then the rest fails and everything stops. Several instances can
live side by side, in one process or many; the module-level API of ``serve_core``
forwards to a default one. The store is the source of truth: every change is validated
against it and committed there (:mod:`serve_core.persistence`), and every instance on the
store converges on it (:meth:`Serve.sync_registry`, run by its watcher,
:mod:`serve_core.sync`). Each backend's running state is its
:class:`~serve_core.runtime.BackendRuntime`; the :class:`~serve_core.router.Router` admits
queries from endpoints to them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import math
import os
import random
import secrets
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from .clock import Clock, SystemClock, wait_for
from .composition import Origin, ReplicaScope, register, unregister
from .config import BackendConfig
from .converge import Converger
from .errors import NotFoundError, ServeStateError, ShuttingDownError, StoreError, ValidationError
from .executors.base import Executor, ExecutorPool, Replica
from .handle import ServeHandle
from .metrics import check_stat_args
from .persistence import (
    CONFIG,
    TRAFFIC,
    RestoreReport,
    Snapshot,
    config_items,
    endpoint_items,
    open_registry_store,
    traffic_items,
)
from .policy import PolicySpec, RoutePolicy
from .prom import Metrics, MetricsConfig
from .queues import NO_DEADLINE, Query, ServeFuture
from .recent_errors import RecentErrors
from .registry import BackendInfo, Registry
from .router import Router
from .runtime import BackendRuntime
from .slo import NO_SLO, SLO
from .split import Traffic
from .sync import InstanceBeacon, InstanceRecord, RegistryWatcher

if TYPE_CHECKING:
    from .http.app import ServeApp
    from .http.dashboard import DashboardApp
    from .http.server import HTTPServer

log = logging.getLogger("serve_core")

DEFAULT_MAX_PENDING_PER_ENDPOINT = 1_000
DEFAULT_PENDING_TIMEOUT_S = 30.0
DEFAULT_DRAIN_TIMEOUT_S = 30.0
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024  # largest HTTP request body (413 past it)
DEFAULT_HTTP_REQUEST_TIMEOUT_S = 300.0  # how long an HTTP request waits for its answer (504 past it)
HTTP_READY_TIMEOUT_S = 10.0
DEFAULT_REGISTRY_POLL_S = 0.25  # how often an instance reads the store's revision
DEFAULT_HEARTBEAT_S = 2.0  # how often it refreshes its instance record
DEFAULT_INSTANCE_EXPIRY_S = 10.0  # a record not refreshed this long is a dead instance's
COMMIT_ATTEMPTS = 200
"""Times a change is validated again after losing the store's compare-and-set, then ``StoreError``.
A loss means another writer committed, so the registry as a whole moves on; but one writer can lose
to a faster one for as long as that one keeps writing (its retry re-reads the whole registry while
the other's next change reads one key), hence a bound well above the changes a burst makes."""
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
        dashboard: the live page at ``/-/dashboard`` (docs/dashboard.md): ``True`` on, ``False``
            off, ``None`` on only where the instance is known to listen on loopback alone (the
            page shows routes, traffic and errors to whoever reaches it, without authentication).
        registry_poll_s: how often the store's revision is read (changes by other processes
            are applied within about this long; PostgreSQL also notifies at once).
        heartbeat_s, instance_expiry_s: how often this instance refreshes its record in the
            store, and after how long without one an instance counts as dead.
        run_replicas: ``False`` for a registry-only client (``serve-core deploy``): changes go
            to the store, no replica starts here, and it is not listed as an instance.
        metrics: the Prometheus metrics, request ids and ``Server-Timing`` header
            (``True``: all on, the default; ``False``: metrics off; a
            :class:`~serve_core.prom.MetricsConfig` for buckets and each part; docs/metrics.md).
        allow_unsigned_store: accept a store without a signing key (PostgreSQL or a connector's
            store without ``SERVE_CORE_SECRET``; also ``SERVE_CORE_ALLOW_UNSIGNED=1``): its records are
            then trusted unsigned, with a warning at every start (docs/kv.md, threat model).

    The registry is kept in the store named by ``kv_store_connector`` / ``kv_store_path``
    (memory when neither is given, or ``":memory:"``) and restored from it here;
    ``restored`` is the :class:`~serve_core.persistence.RestoreReport` of what came back
    (see docs/kv.md). Changes made by other instances on the store are applied as they
    come (docs/sharing.md).
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
        dashboard: bool | None = None,
        registry_poll_s: float = DEFAULT_REGISTRY_POLL_S,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        instance_expiry_s: float = DEFAULT_INSTANCE_EXPIRY_S,
        run_replicas: bool = True,
        metrics: bool | MetricsConfig = True,
        allow_unsigned_store: bool = False,
    ) -> None:
        self.init_kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        check_stat_args((), (), gc_window_seconds)
        _check_options(max_body_bytes, http_request_timeout_s, drain_timeout_s)
        _check_sync_options(registry_poll_s, heartbeat_s, instance_expiry_s)
        self._own_clock = SystemClock() if clock is None else None
        self.clock: Clock = clock or self._own_clock  # type: ignore[assignment]
        self.gc_window_seconds = gc_window_seconds
        self.start_server = start_server
        self.max_body_bytes, self.debug = max_body_bytes, debug
        if dashboard is not None and not isinstance(dashboard, bool):
            raise ValidationError(f"dashboard must be None, True or False, got {dashboard!r}")
        self.dashboard = dashboard
        self.http_request_timeout_s = http_request_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.instance_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        register(self)  # unpickled handles of this instance bind to it (serve_core.composition)
        self.heartbeat_s, self.instance_expiry_s = heartbeat_s, instance_expiry_s
        self._run_replicas = run_replicas
        self._keeping_store = False  # inside keep_store_state()
        self._changed_here: set[str] = set()  # backends whose code keep_store_state()'s block wrote
        self._notes: list[str] = []
        self._http_attached: str | None = None
        self._watcher: RegistryWatcher | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._admin = threading.RLock()  # serialises registry changes, convergence and shutdown
        self.metrics = Metrics(MetricsConfig.of(metrics), self.clock)
        self._recent_errors = RecentErrors(self.clock, debug=debug)
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
        self._dashboard: DashboardApp | None = None
        self._http: HTTPServer | None = None
        self._state = State.RUNNING
        self._stopped = threading.Event()
        try:
            self._store = open_registry_store(kv_store_path, kv_store_connector, allow_unsigned_store)
        except BaseException:
            self._stop(())
            raise
        self._beacon = InstanceBeacon(self._store, self.clock, self.instance_id, heartbeat_s, instance_expiry_s)
        self._conv = Converger(
            store=self._store,
            router=self._router,
            new_runtime=self._new_runtime,
            clock=self.clock,
            drain_timeout_s=drain_timeout_s,
            run_replicas=run_replicas,
        )
        self.restored: RestoreReport = self._restore()
        if start_server:
            self._start_http(http_host, http_port, blocking)
        if run_replicas:
            self._start_watching(registry_poll_s)

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
            metrics=self.metrics,
            recent_errors=self._recent_errors,
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
        report = RestoreReport()
        try:
            with self._admin:
                self._converge(self._store.load(), report)
        except BaseException:
            self.shutdown()
            raise
        if report:
            log.info(
                "serve_core: restored from %s: endpoints %s, backends %s, traffic %s%s%s",
                self._store.description, report.endpoints, report.backends, report.traffic,
                f"; waiting for their module: {report.deferred}" if report.deferred else "",
                f"; NOT restored: {sorted(report.failed)}" if report.failed else "",
            )
        return report

    def _start_watching(self, poll_s: float) -> None:
        try:
            self._beat(force=True)
            self._watcher = RegistryWatcher(self.clock, poll_s, self.sync_registry)
            self._unsubscribe = self._store.subscribe(self._watcher.wake)
            self._watcher.start()
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
            runtimes = list(self._conv.runtimes.values())
        if not first:  # another thread is shutting it down: return once it has stopped
            self._stopped.wait(2 * self.drain_timeout_s + STOP_GRACE_S)
            return
        self._stop_watching()
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

    def _stop_watching(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._watcher is not None:
            self._watcher.stop()
        if self._watcher is not None:
            try:  # gone from `serve-core status` at once, rather than when the record expires
                self._beacon.remove()
            except StoreError as exc:
                log.warning("serve_core: could not remove this instance's record: %s", exc)

    def _stop(self, runtimes: Iterable[BackendRuntime], stop_timeout: float = 0.0) -> None:
        with self._admin:
            self._state = State.STOPPED
        unregister(self)
        for runtime in runtimes:
            runtime.close(stop_timeout)
        converger = getattr(self, "_conv", None)  # absent when the store could not be opened
        if converger is not None:
            converger.join_retiring(stop_timeout)
        self._executors.shutdown()
        if self._http is not None:
            self._http.close()
        store = getattr(self, "_store", None)
        if store is not None:
            store.close()
        self.metrics.close()
        if self._own_clock is not None:
            self._own_clock.close()
        self._stopped.set()

    def __enter__(self) -> Serve:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    # ------------------------------------------------------------ convergence
    def sync_registry(self) -> None:
        """Converge on the store now (the watcher does it every ``registry_poll_s``): apply what
        other processes changed, then write this instance's heartbeat if one is due."""
        with self._admin:
            if self._state is not State.RUNNING:
                return
            if self._store.revision() != self._conv.revision or self._conv.deferred:
                self._converge(self._store.load())
            if self._watcher is not None:
                self._beat()

    def _converge(self, snapshot: Snapshot, report: RestoreReport | None = None) -> None:
        """Make this instance serve what ``snapshot`` holds (:class:`~serve_core.converge.Converger`)."""
        if self._conv.converge(snapshot, report):
            self._beacon.stale(len(self._conv.registry.configs))  # tell the store soon which revision is applied
            if self._watcher is not None and self._state is State.RUNNING:
                try:  # so `serve-core status` shows the new revision applied here at once
                    self._beat()
                except StoreError as exc:  # the change itself is committed; the next heartbeat retries
                    log.debug("serve_core: heartbeat after a change failed: %s", exc)

    # -------------------------------------------------------------- instances
    def _beat(self, force: bool = False) -> None:
        """Refresh this instance's record in the store, when due (or now with ``force``)."""
        if not (force or self._beacon.due()):
            return
        address = self.http_address()
        runtimes = self._conv.runtimes
        self._beacon.beat(
            http=None if address is None else f"{address[0]}:{address[1]}",
            executor=str(self._executors.default),
            revision=self._conv.revision,
            backends={
                tag: {
                    "desired": runtimes[tag].target_replicas if tag in runtimes else config.initial_replicas,
                    "running": len(runtimes[tag].replicas()) if tag in runtimes else 0,
                }
                for tag, config in list(self._conv.registry.configs.items())
            },
            force=force,
        )

    def instances(self) -> list[InstanceRecord]:
        """The live instances on this instance's store (this one included), oldest first."""
        return self._beacon.live()

    def readiness(self) -> dict[str, Any]:
        """Whether every endpoint with traffic can be served here (``GET /-/readyz``).

        Returns:
            ``{"ready": bool, "not_ready": {endpoint: why}}``: an endpoint is ready when a
            backend it sends traffic to (weight > 0) has a replica in service on this instance.
            Traffic is the store's (one key read; the registry when this instance lags behind it).
        """
        if self._state is not State.RUNNING:
            return {"ready": False, "not_ready": {"*": f"this instance is {self._state.value}"}}
        registry = self._conv.registry
        try:  # measured against the store: this instance may still be converging on a change
            if self._store.revision() != self._conv.revision:
                registry = self._store.load().registry(self._store.description)[0]
        except StoreError as exc:
            return {"ready": False, "not_ready": {"*": f"the store cannot be read: {exc}"}}
        not_ready: dict[str, str] = {}
        for name, weights in sorted(registry.traffic.items()):
            reasons = []
            for tag in sorted(tag for tag, weight in weights.items() if weight > 0):
                runtime = self._conv.runtimes.get(tag)
                if runtime is not None and runtime.replicas():
                    break
                reasons.append(f"{tag}: {'no replica ready' if runtime is not None else 'not started here'}")
            else:
                not_ready[name] = "; ".join(reasons) or "no backend with weight"
        return {"ready": not not_ready, "not_ready": not_ready}

    @property
    def revision(self) -> int:
        """The store revision this instance has applied."""
        return self._conv.revision

    @contextlib.contextmanager
    def keep_store_state(self) -> Iterator[list[str]]:
        """Run a deployment file again on a live store without undoing what operators changed since.

        Inside the block, ``split``/``link`` of an endpoint that already has traffic and
        ``set_backend_config`` of a stored backend keep what the store holds, except for
        backends whose code the block itself wrote (new, or ``replace=True``). Yields the
        list of notes saying what was kept (``serve-core run`` prints them).
        """
        with self._admin:
            self._keeping_store, self._changed_here, self._notes = True, set(), []
            try:
                yield self._notes
            finally:
                self._keeping_store = False

    def _note(self, text: str) -> None:
        if self._keeping_store:
            self._notes.append(text)

    # ------------------------------------------------------------ changes
    def _change(self, plan: Callable[[Registry, Snapshot], dict[str, Any] | None]) -> None:
        """Validate a change against the store's registry and commit it, then converge.

        ``plan`` returns the keys to write, or ``None`` for a no-op; it is asked again
        (against the newer state) when another writer committed first.
        """
        for _ in range(COMMIT_ATTEMPTS):
            snapshot = self._store.load()
            items = plan(snapshot.registry(self._store.description)[0], snapshot)
            if not items:
                self._converge(snapshot)
                return
            if self._store.commit(snapshot.revision, items):
                self._converge(self._store.latest())
                return
        raise StoreError(f"store {self._store.description}: the registry kept changing under this call; try again")

    # ------------------------------------------------------------ endpoints
    def create_endpoint(
        self, endpoint_name: str, route: str | None = None, methods: Iterable[str] = ("GET",)
    ) -> None:
        """Register an endpoint; ``route=None`` makes it reachable from Python only.

        Raises:
            ValidationError: bad name, route or method. ConflictError: name or route taken.
        """

        def plan(registry: Registry, snapshot: Snapshot) -> dict[str, Any] | None:
            info = registry.check_endpoint(endpoint_name, route, methods)
            return None if info is None else endpoint_items(info)

        with self._admin:
            self._check_running()
            self._change(plan)

    # ------------------------------------------------------------- backends
    def create_backend(
        self,
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
        with self._admin:
            self._check_running()
            spare: list[BackendRuntime] = []  # started by an attempt another writer beat: the next one may use it
            try:
                self._create_backend(func_or_class, backend_tag, actor_init_args, backend_config, replace, spare)
            finally:
                for runtime in spare:
                    runtime.close(0)

    def _create_backend(
        self,
        func_or_class: Any,
        backend_tag: str,
        actor_init_args: tuple[Any, ...],
        backend_config: BackendConfig | None,
        replace: bool,
        spare: list[BackendRuntime],
    ) -> None:
        for _ in range(COMMIT_ATTEMPTS):
            snapshot = self._store.load()
            registry = snapshot.registry(self._store.description)[0]
            info, config = registry.check_backend(
                func_or_class, backend_tag, actor_init_args, backend_config, replace
            )
            stored = registry.backends.get(info.tag)
            if stored is not None and stored.code_id is None:  # written before code ids: record it now
                items = self._store.encode_backend(info, registry.configs[info.tag])
                if not self._store.commit(snapshot.revision, items):
                    continue
                snapshot = self._store.latest()
                stored = dataclasses.replace(stored, code_id=info.code_id)
            if stored is not None and stored.code_id == info.code_id:
                self._adopt(info, registry.configs[info.tag], backend_config, snapshot)
                return
            if stored is not None and backend_config is None:
                config = registry.configs[info.tag]  # a replacement or a legacy record keeps its config
            if self._install_new(info, config, snapshot.revision, spare):
                return
        raise StoreError(f"store {self._store.description}: the registry kept changing under this call; try again")

    def _adopt(
        self, info: BackendInfo, stored: BackendConfig, asked: BackendConfig | None, snapshot: Snapshot
    ) -> None:
        """``create_backend`` of code the store already holds: serve it here if not yet, with the stored config."""
        if asked is not None and asked != stored:
            log.info(
                "backend %r already exists with identical code in %s; keeping its stored config "
                "(use set_backend_config to change it)", info.tag, self._store.description,
            )
            self._note(f"backend {info.tag!r}: kept the stored config (num_replicas={stored.num_replicas})")
        running = self._conv.runtimes.get(info.tag)
        if self._run_replicas and (running is None or running.definition.code_id != info.code_id):
            runtime = self._new_runtime(info, stored)
            runtime.start()
            self._conv.install(runtime)  # no longer deferred, nor failed
        self._converge(snapshot)

    def _install_new(
        self, info: BackendInfo, config: BackendConfig, revision: int, spare: list[BackendRuntime]
    ) -> bool:
        """Start a new definition's replicas, then commit it; ``False`` when another writer was first.

        The replicas then wait in ``spare`` for the next attempt, which commits at once if it
        validates the same definition and config: an attempt's window for other writers is one
        commit, not a replica start (two processes registering at once would otherwise keep
        beating each other).
        """
        items = self._store.encode_backend(info, config)  # fails before any replica starts
        runtime: BackendRuntime | None = None
        if self._run_replicas:
            runtime = self._spare_runtime(info, config, spare)
            if runtime is None:
                runtime = self._new_runtime(info, config)
                runtime.start()
        try:  # written once the replicas are up, before the backend is visible
            committed = self._store.commit(revision, items)
        except BaseException:
            if runtime is not None:
                runtime.close(0)
            raise
        if not committed:
            if runtime is not None:
                spare.append(runtime)
            return False
        if runtime is not None:
            self._conv.install(runtime)
        self._changed_here.add(info.tag)
        self._converge(self._store.latest())
        return True

    @staticmethod
    def _spare_runtime(info: BackendInfo, config: BackendConfig, spare: list[BackendRuntime]) -> BackendRuntime | None:
        """The runtime an earlier attempt started for this very definition and config (others are closed)."""
        while spare:
            runtime = spare.pop()
            if runtime.definition.code_id == info.code_id and runtime.config == config:
                return runtime
            runtime.close(0)
        return None

    def _new_runtime(self, info: BackendInfo, config: BackendConfig) -> BackendRuntime:
        return BackendRuntime(
            info,
            config,
            executors=self._executors,
            clock=self.clock,
            gc_window_seconds=self.gc_window_seconds,
            drain_timeout_s=self.drain_timeout_s,
            count_error=self._router.count_error,
            metrics=self.metrics,
            scope=ReplicaScope(self, info.tag),
        )

    def _runtime(self, backend_tag: str) -> BackendRuntime:
        runtime = self._conv.runtimes.get(backend_tag)
        if runtime is None:
            self._conv.registry.backend(backend_tag)
            raise NotFoundError(f"backend {backend_tag!r} is not running on this instance (see the log)")
        return runtime

    def get_backend_config(self, backend_tag: str) -> BackendConfig:
        """A detached copy of the backend's config (as the store holds it)."""
        self._conv.registry.backend(backend_tag)
        return self._conv.registry.configs[backend_tag].copy()

    def set_backend_config(self, backend_tag: str, backend_config: BackendConfig) -> None:
        """Apply a config live, on every instance: replica count, batching, queue bound, placement.

        It is applied here first: if a replica fails to start, the old config stays in force
        (and in the store) and the error is raised.
        """
        with self._admin:
            self._check_running()
            for _ in range(COMMIT_ATTEMPTS):
                snapshot = self._store.load()
                registry = snapshot.registry(self._store.description)[0]
                config = registry.check_config(registry.backend(backend_tag), backend_config)
                stored = registry.configs[backend_tag]
                if (
                    self._keeping_store
                    and backend_tag not in self._changed_here
                    and stored != config
                    and snapshot.deployed(CONFIG, backend_tag) != stored.to_dict()  # changed at runtime since
                ):
                    self._note(f"backend {backend_tag!r}: kept the stored config instead of the file's")
                    self._converge(snapshot)
                    return
                runtime = self._conv.runtimes.get(backend_tag)
                old = runtime.config if runtime is not None else None
                if runtime is not None:
                    runtime.reconfigure(config)  # also restarts missing replicas when the config is the same
                if registry.configs[backend_tag] == config:
                    self._converge(snapshot)
                    return
                try:
                    items = config_items(backend_tag, config, deployed=self._keeping_store)
                    committed = self._store.commit(snapshot.revision, items)
                except BaseException:
                    if runtime is not None and old is not None:
                        runtime.reconfigure(old)
                    raise
                if committed:
                    self._converge(self._store.latest())
                    return
        raise StoreError(f"store {self._store.description}: the registry kept changing under this call; try again")

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
        """Split the endpoint's traffic by weight, on every instance; invalid input changes nothing."""

        def plan(registry: Registry, snapshot: Snapshot) -> dict[str, Any] | None:
            weights = registry.check_split(endpoint_name, traffic_policy_dictionary)
            stored = registry.traffic.get(endpoint_name)
            if stored == weights:
                return None
            if self._keeping_store and stored is not None and not self._changed_here.intersection(weights):
                if snapshot.deployed(TRAFFIC, endpoint_name) != stored:  # changed at runtime since
                    self._note(
                        f"endpoint {endpoint_name!r}: kept the stored traffic {stored} (the file asks {weights})"
                    )
                    return None
            return traffic_items(endpoint_name, weights, deployed=self._keeping_store)

        with self._admin:
            self._check_running()
            self._change(plan)

    def route_table(self) -> dict[str, list[Any]]:
        """``{route: [endpoint, [methods]]}`` of the endpoints reachable over HTTP."""
        return {route: [name, list(methods)] for route, (name, methods) in list(self._conv.route_table.items())}

    @property
    def routes_version(self) -> int:
        """A number that changes whenever :meth:`route_table` does."""
        return self._conv.routes_version

    def list_endpoints(self) -> dict[str, dict[str, Any]]:
        """Every endpoint: ``{name: {"route": ..., "methods": [...], "traffic": {tag: weight} | None}}``."""
        registry = self._conv.registry
        return {
            name: {"route": info.route, "methods": list(info.methods), "traffic": registry.traffic.get(name)}
            for name, info in sorted(registry.endpoints.items())
        }

    def list_backends(self) -> dict[str, BackendConfig]:
        """Every backend's tag and a detached copy of its config (as the store holds it)."""
        configs = self._conv.registry.configs
        return {tag: configs[tag].copy() for tag in sorted(configs)}

    def get_traffic_policy(self, endpoint_name: str) -> dict[str, float]:
        """The endpoint's ``{backend_tag: weight}``."""
        self._conv.registry.endpoint(endpoint_name)
        traffic = self._conv.registry.traffic.get(endpoint_name)
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
        if not self._run_replicas:
            raise ServeStateError("a registry-only client (run_replicas=False) cannot call endpoints")
        if not missing_ok and not self._conv.has_endpoint(endpoint_name):
            self._conv.registry.endpoint(endpoint_name)  # raises, naming the endpoints there are
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
        stream: bool = False,
        caller_runs: bool = False,
        caller_timeout_s: float | None = None,
        origin: Origin | None = None,
    ) -> ServeFuture:
        """Call an endpoint: the one entry that handles and the HTTP front use.

        Args:
            endpoint_name: the endpoint to call (it may have no traffic yet).
            kwargs: the keyword arguments of a Python call.
            request: the web request of an HTTP call (``None`` for Python calls).
            method_name: the backend method to call.
            slo: the call's deadline (:meth:`SLO.parse`).
            shard_key: pins the call to one backend of a split while the weights stay.
            stream: a backend that returns a generator may stream to this Python caller
                (web calls always may): the future's result is then an
                :class:`~serve_core.streams.ItemStream`, answered at the first item.
            caller_runs: the caller blocks on the answer right after this returns: a
                synchronous call that finds its replica free may run in this thread, in which
                case the future is answered when this returns (``BackendConfig.caller_runs``).
            caller_timeout_s: how long the caller then waits (None: as long as it takes); with
                a timeout, only a backend whose recent calls were short runs in the caller
                (:mod:`serve_core.callerruns`).
            origin: for a call made inside a replica, the caller's deadline (the earlier of
                the two counts) and chain (:mod:`serve_core.composition`).

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
        query = Query(endpoint_name, method_name, kwargs or {}, request, deadline, shard_key, future, arrival)
        if stream:
            query.stream = True
        if caller_runs:
            query.caller_runs, query.caller_timeout_s = True, caller_timeout_s
        if origin is not None:
            query.deadline = min(deadline, origin.deadline)
            query.chain = origin.chain
        self._router.submit(query)
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

    def metrics_app(self) -> Callable[..., Iterable[bytes]]:
        """A WSGI app answering every request with this instance's Prometheus metrics.

        For serving them apart from ``/-/metrics`` (another port, behind other auth), e.g.
        ``DispatcherMiddleware(flask_app, {"/metrics": srv.metrics_app()})``. Needs
        ``pip install serve-core[metrics]``.

        Raises:
            NotFoundError: metrics are disabled (``metrics=False``).
            ServeStateError: prometheus-client is not installed.
        """
        return self.metrics.exporter().wsgi_app()

    def dashboard_app(self) -> DashboardApp:
        """The live dashboard as a WSGI app: ``-/dashboard`` under where it is mounted (docs/dashboard.md)."""
        if self._dashboard is None:
            from .http.dashboard import DashboardApp  # lazy: the core does not import Werkzeug

            self._dashboard = DashboardApp(self, lambda: dict(self._conv.runtimes))
        return self._dashboard

    def http_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the standalone HTTP server, or None when it is not running."""
        return self._http.address if self._http is not None and self._state is not State.STOPPED else None

    def _start_http(self, host: str, port: int, blocking: bool) -> None:
        from .http.server import HTTPServer

        try:
            try:
                self._http = HTTPServer(self.wsgi_app(), host, port)
            except ServeStateError:
                if not self._attach(port):
                    raise
                return
            if blocking:
                self._http.wait_ready(HTTP_READY_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise

    def _attach(self, port: int) -> bool:
        """The port is taken: if another live instance on this store serves it, share the store without a server."""
        host = socket.gethostname()
        for record in self.instances():
            if record.host == host and record.http is not None and record.http.rsplit(":", 1)[-1] == str(port):
                self._http_attached = record.http
                log.warning(
                    "serve_core: port %d is served by instance %s on store %s; this instance attaches to the "
                    "store without an HTTP server of its own (its changes reach that server)",
                    port, record.instance_id, self._store.description,
                )
                return True
        return False

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

    def recent_errors(self) -> list[dict[str, Any]]:
        """The last errors calls were answered with, oldest first (handle and HTTP calls; docs/dashboard.md).

        Each is ``{"time", "error_id", "endpoint", "backend", "kind", "type", "count"}``, plus
        ``method`` and ``path`` for an HTTP 500, and ``message`` and ``traceback`` in debug mode.
        """
        return self._recent_errors.recent()

    def annotate_error(self, error_id: str, *, method: str, path: str) -> bool:
        """Attach the HTTP request that failed with ``error_id`` to its recent error (the HTTP front calls this)."""
        return self._recent_errors.annotate(error_id, method=method, path=path)

    def __repr__(self) -> str:
        registry = self._conv.registry
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


def _check_sync_options(registry_poll_s: Any, heartbeat_s: Any, instance_expiry_s: Any) -> None:
    for name, value in (
        ("registry_poll_s", registry_poll_s), ("heartbeat_s", heartbeat_s), ("instance_expiry_s", instance_expiry_s)
    ):
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < value < math.inf):
            raise ValidationError(f"{name} must be a positive number of seconds, got {value!r}")
    if instance_expiry_s <= heartbeat_s:
        raise ValidationError(
            f"instance_expiry_s ({instance_expiry_s}) must be longer than heartbeat_s ({heartbeat_s})"
        )


def warn_if_different(running: Serve, requested: dict[str, Any]) -> None:
    """``init`` is idempotent: tell the caller when its arguments are ignored."""
    differing = sorted(k for k, v in requested.items() if running.init_kwargs.get(k) != v)
    if differing:
        warnings.warn(
            f"serve_core is already initialised; ignoring different arguments {differing} "
            "(call shutdown() first to re-initialise)",
            stacklevel=3,
        )

"""Convergence: making one instance serve what its store holds.

A :class:`Converger` owns an instance's backend runtimes and the registry revision it has
applied. Given a :class:`~serve_core.persistence.Snapshot` it starts the backends it does
not run yet (code imported or unpickled), replaces those whose code changed under their tag,
applies changed configs, and installs each endpoint's traffic over the backends that run
here (renormalised, in memory only, when some do not). It is idempotent and level-triggered:
the same snapshot twice changes nothing, and a backend that failed is tried again only when
its code changes. Failures are logged once each; a :class:`RestoreReport` collects them on
the first convergence (``Serve.restored``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from .clock import Clock, wait_for
from .codestore import ModuleInitializingError
from .config import BackendConfig
from .persistence import BACKEND, TRAFFIC, RegistryStore, RestoreReport, Snapshot
from .registry import BackendInfo, BackendSpec, Registry
from .router import Router
from .runtime import BackendRuntime

log = logging.getLogger("serve_core")

RuntimeFactory = Callable[[BackendInfo, BackendConfig], BackendRuntime]


class Converger:
    """The backends an instance runs, and the registry revision it has applied.

    Args:
        store: the registry's store (code is decoded through it).
        router: where runtimes and traffic are installed.
        new_runtime: builds a (not yet started) runtime for a definition and config.
        clock: the instance's clock (a replaced runtime's drain waits on it).
        drain_timeout_s: how long a replaced runtime may finish its calls.
        run_replicas: ``False`` for a registry-only client: only the registry is followed.
    """

    def __init__(
        self,
        *,
        store: RegistryStore,
        router: Router,
        new_runtime: RuntimeFactory,
        clock: Clock,
        drain_timeout_s: float,
        run_replicas: bool,
    ) -> None:
        self._store = store
        self._router = router
        self._new_runtime = new_runtime
        self._clock = clock
        self._drain_timeout = drain_timeout_s
        self._run_replicas = run_replicas
        self.registry = Registry()  # as applied here
        self._applying: Registry | None = None  # while converge() starts what it holds
        self.revision = -1  # the store revision applied here (-1: none yet)
        self.routes_version = 0  # moves whenever the applied route table does
        self.runtimes: dict[str, BackendRuntime] = {}
        self.deferred: set[str] = set()  # backends whose module is still being imported
        self._applied_traffic: dict[str, dict[str, float]] = {}
        self._failed: dict[str, str | None] = {}  # tag -> code id that could not be loaded here
        self._reported: set[str] = set()  # problems already logged
        self._retiring: list[threading.Thread] = []

    # --------------------------------------------------------------- converge
    def converge(self, snapshot: Snapshot, report: RestoreReport | None = None) -> bool:
        """Serve what ``snapshot`` holds; returns whether its revision was new here."""
        registry, problems = snapshot.registry(self._store.description)
        for key, why in problems.items():
            self._problem(key, why, report)
        if self._run_replicas:
            self._applying = registry
            try:
                self._converge_backends(snapshot, registry, report)
                self._converge_traffic(registry, report)
            finally:
                self._applying = None
        if registry.route_table() != self.registry.route_table():
            self.routes_version += 1
        if report is not None:
            report.endpoints.extend(registry.endpoints)
        moved = snapshot.revision != self.revision
        self.registry, self.revision = registry, snapshot.revision
        return moved

    def has_endpoint(self, name: str) -> bool:
        """Whether ``name`` is an endpoint here, or of the registry being applied (a constructor
        that asks for a handle while its backend is restored)."""
        applying = self._applying
        return name in self.registry.endpoints or (applying is not None and name in applying.endpoints)

    def _converge_backends(self, snapshot: Snapshot, registry: Registry, report: RestoreReport | None) -> None:
        records = snapshot.group(BACKEND)
        for tag, spec in registry.backends.items():
            runtime = self.runtimes.get(tag)
            config = registry.configs[tag]
            if runtime is not None and spec.code_id in (None, runtime.definition.code_id):
                if runtime.config != config:
                    self._reconfigure(runtime, config)
                continue
            if tag in self._failed and self._failed[tag] == spec.code_id:
                continue  # this code failed here already: wait for new code (or a restart)
            self._start_stored(tag, records[tag], spec, config, report)

    def _start_stored(
        self, tag: str, record: Any, spec: BackendSpec, config: BackendConfig, report: RestoreReport | None
    ) -> None:
        try:
            info = self._store.decode_backend(tag, record, spec)
        except ModuleInitializingError as exc:
            if tag not in self.deferred:
                log.info("serve_core: backend %r waits: %s", tag, exc)
                if report is not None:
                    report.deferred.append(tag)
            self.deferred.add(tag)
            return
        except Exception as exc:  # noqa: BLE001 - loading user code can raise anything
            self._failed[tag] = spec.code_id
            self._problem(BACKEND + tag, f"{type(exc).__name__}: {exc}", report)
            return
        self.deferred.discard(tag)
        runtime = self._new_runtime(info, config)
        try:
            runtime.start()
        except Exception as exc:  # noqa: BLE001 - a constructor that raises must not stop the others
            runtime.close(0)
            self._failed[tag] = spec.code_id
            self._problem(BACKEND + tag, f"{type(exc).__name__}: {exc}", report)
            return
        self.install(runtime)
        if report is not None:
            report.backends.append(tag)

    @staticmethod
    def _reconfigure(runtime: BackendRuntime, config: BackendConfig) -> None:
        try:
            runtime.reconfigure(config)
        except Exception as exc:  # noqa: BLE001 - the store's config stays desired; status shows the gap
            log.error(
                "serve_core: backend %r: could not apply the stored config here (%s: %s); running %d replicas",
                runtime.tag, type(exc).__name__, exc, len(runtime.replicas()),
            )

    def _converge_traffic(self, registry: Registry, report: RestoreReport | None) -> None:
        for name, weights in registry.traffic.items():
            kept = {tag: weight for tag, weight in weights.items() if tag in self.runtimes}
            missing = sorted(tag for tag, weight in weights.items() if tag not in kept and weight > 0)
            total = sum(kept.values())
            if total <= 0:
                if not self.deferred.intersection(weights):
                    why = f"StoreError: none of its backends with weight runs here (missing {missing})"
                    self._problem(TRAFFIC + name, why, report)
                continue
            effective = {tag: weight / total for tag, weight in kept.items()} if missing else dict(weights)
            if missing and not self.deferred.intersection(missing):
                note = f"serving without {missing}; weights renormalised to {effective}"
                if report is not None:
                    report.degraded[name] = note
                self._log_once("degraded/" + name + note, logging.WARNING, f"endpoint {name!r} {note}")
            if self._applied_traffic.get(name) != effective:
                self._router.set_traffic(name, effective)
                self._applied_traffic[name] = effective
            if report is not None:
                report.traffic.append(name)

    def _problem(self, key: str, why: str, report: RestoreReport | None) -> None:
        if report is not None:
            report.failed[key] = why
        self._log_once(key + why, logging.ERROR, f"could not restore {key}: {why}")

    def _log_once(self, key: str, level: int, message: str) -> None:
        if key not in self._reported:  # not at every convergence
            self._reported.add(key)
            log.log(level, "serve_core: %s", message)

    # ---------------------------------------------------------------- runtimes
    def install(self, runtime: BackendRuntime) -> None:
        """Serve ``runtime`` under its tag; a runtime it replaces drains, then stops."""
        old = self.runtimes.get(runtime.tag)
        self.runtimes[runtime.tag] = runtime
        self._router.add_backend(runtime)
        self._failed.pop(runtime.tag, None)
        self.deferred.discard(runtime.tag)
        self._applied_traffic.clear()  # policies hold the tag; rebuilt by the next convergence
        if old is not None:
            self._retire(old)

    def _retire(self, runtime: BackendRuntime) -> None:
        runtime.stop_admitting()
        thread = threading.Thread(target=self._drain_and_close, args=(runtime,), name="serve-retire", daemon=True)
        self._retiring.append(thread)
        thread.start()

    def _drain_and_close(self, runtime: BackendRuntime) -> None:
        idle: Future[None] = Future()
        runtime.when_idle(lambda: idle.set_result(None) if not idle.done() else None)
        wait_for(self._clock, idle, self._drain_timeout)
        runtime.close(0)

    def join_retiring(self, timeout: float) -> None:
        """Wait (bounded) for replaced runtimes to have drained and stopped."""
        for thread in list(self._retiring):
            thread.join(timeout)

"""Replica management: starting, scaling, draining and replacing replicas.

Owns the executors of one ``Serve`` instance (created lazily by name) and keeps the
router's replica slots matching each backend's ``num_replicas``.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from .config import BackendConfig
from .errors import ReplicaDiedError
from .executors.base import Executor, Replica, ReplicaSpec, create_executor
from .registry import BackendInfo
from .router import Router

log = logging.getLogger("serve_core")


class ReplicaManager:
    """Starts and stops the replicas of every backend.

    Args:
        default_executor: the instance's executor (name or object).
        executor_options: keyword arguments for executors built by name.
        drain_timeout_s: how long a removed replica may take to finish its call.
        admin: the owner's lock around registry changes; replacing a dead replica takes it.
        lookup: the current definition of a backend, or None once the owner stopped.
    """

    def __init__(
        self,
        default_executor: str | Executor,
        executor_options: dict[str, Any],
        drain_timeout_s: float,
        admin: threading.RLock,
        lookup: Callable[[str], BackendInfo | None],
    ) -> None:
        self._admin = admin
        self._lookup = lookup
        self._replacers_lock = threading.Lock()
        self._executors: dict[str, Executor] = {}
        self._options = executor_options
        self._drain_timeout = drain_timeout_s
        default = create_executor(default_executor, **executor_options)
        self._executors[default.name] = default
        self.default_executor = default.name
        self._hinted: set[tuple[str, str, str]] = set()  # (backend, executor, hints) already warned about
        if executor_options.get("ray_init_kwargs") and not _places_replicas(default):
            log.warning(
                "ray_init_kwargs are only used by the ray executor; the default executor %r ignores them "
                "(backends with BackendConfig(executor='ray') still use them)",
                default.name,
            )
        self._ids = itertools.count(1)
        self._replacers: list[threading.Thread] = []
        self._stopped = False

    def executor_for(self, config: BackendConfig) -> Executor:
        name = config.executor or self.default_executor
        executor = self._executors.get(name)
        if executor is None:
            executor = self._executors[name] = create_executor(name, **self._options)
        return executor

    def start(self, info: BackendInfo, count: int) -> list[Replica]:
        """Start ``count`` replicas; on a failure, stop those started and re-raise."""
        executor = self.executor_for(info.config)
        self._warn_unused_hints(info, executor)
        started: list[Replica] = []
        try:
            for _ in range(count):
                spec = ReplicaSpec(
                    info.tag, f"{info.tag}#{next(self._ids)}", info.target, info.init_args, info.config
                )
                started.append(executor.start_replica(spec))
        except BaseException:
            for replica in started:
                replica.stop(0)
            raise
        return started

    def _warn_unused_hints(self, info: BackendInfo, executor: Executor) -> None:
        """Placement hints (``num_gpus``...) mean nothing to an executor that does not place replicas."""
        if _places_replicas(executor):
            return
        hints = {k: v for k, v in info.config.placement().items() if k != "executor" and v is not None}
        key = (info.tag, executor.name, repr(sorted(hints.items())))
        if hints and key not in self._hinted:
            self._hinted.add(key)
            log.warning(
                "backend %r: %s only place replicas on the ray executor; the %r executor ignores them",
                info.tag, ", ".join(f"{k}={v!r}" for k, v in hints.items()), executor.name,
            )

    def scale(self, router: Router, info: BackendInfo, target: int) -> None:
        """Bring the backend to ``target`` replicas; removed ones drain first."""
        current = router.replica_count(info.tag)
        if target > current:
            for replica in self.start(info, target - current):
                router.add_replica(info.tag, replica)
        elif target < current:
            self._drain_and_stop(router.retire_replicas(info.tag, current - target))

    def replace_all(self, router: Router, info: BackendInfo) -> None:
        """Replace replicas one by one: the new one is ready before an old one drains."""
        for _ in range(router.replica_count(info.tag)):
            (replica,) = self.start(info, 1)
            router.add_replica(info.tag, replica)
            self._drain_and_stop(router.retire_replicas(info.tag, 1, oldest=True))

    def _drain_and_stop(self, slots: list[Any]) -> None:
        for slot in slots:
            try:
                slot.drained.result(timeout=self._drain_timeout)
            except FutureTimeout:
                log.warning("replica %s did not drain in time; stopping it", slot.replica.replica_id)
            slot.replica.stop(self._drain_timeout)

    def replace_dead(self, router: Router, tag: str, dead: Replica) -> None:
        """Replace a replica that died, from a helper thread (never on the caller's)."""
        thread = threading.Thread(
            target=self._replace, args=(router, tag, dead), name=f"serve-replace-{dead.replica_id}", daemon=True
        )
        with self._replacers_lock:
            if self._stopped:
                return
            self._replacers = [t for t in self._replacers if t.is_alive()] + [thread]
            thread.start()

    def _replace(self, router: Router, tag: str, dead: Replica) -> None:
        try:
            dead.stop(0)
        except Exception:  # noqa: BLE001 - it is already dead; cleanup is best effort
            log.debug("stopping dead replica %s failed", dead.replica_id, exc_info=True)
        with self._admin:  # no scaling or config change runs meanwhile
            info = self._lookup(tag)  # the current definition, None once stopped
            if info is None or router.replica_count(tag) >= info.config.num_replicas:
                return
            try:
                (replica,) = self.start(info, 1)
            except Exception as exc:  # noqa: BLE001
                log.exception("could not replace dead replica %s of %s", dead.replica_id, tag)
                router.mark_broken(tag, ReplicaDiedError(
                    f"backend {tag!r} has no replica left: restarting one failed with {exc!r}; "
                    "fix the cause, then set_backend_config() starts replicas again"
                ))
                return
            log.warning("replaced dead replica %s of %s with %s", dead.replica_id, tag, replica.replica_id)
            router.add_replica(tag, replica)

    def stop_replacing(self) -> None:
        """No more replacements; wait for those under way."""
        with self._replacers_lock:
            self._stopped = True
        for thread in self._replacers:
            thread.join(self._drain_timeout)

    def shutdown(self, replicas: list[Replica]) -> None:
        """Stop every replica (each finishes accepted work first), then the executors."""
        self.stop_replacing()
        for replica in replicas:
            replica.stop(self._drain_timeout)
        for executor in self._executors.values():
            executor.shutdown()


def _places_replicas(executor: Executor) -> bool:
    """Whether ``executor`` honours placement hints and ``ray_init_kwargs`` (the Ray executor does)."""
    return bool(getattr(executor, "places_replicas", False))

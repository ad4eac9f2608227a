"""A backend's supervisor: autoscaling decisions and replica health checks, on the clock's timers.

Both run from timers of the instance's clock, so tests drive them with the fake clock, and
both only *decide* there: what takes time (starting a replica, draining one) is handed to the
runtime's helper threads (:meth:`Supervised.resize_later`, :meth:`Supervised.evict_later`).

* **Autoscaling.** Every :data:`~serve_core.autoscale.DECISION_PERIOD_S` the
  :class:`~serve_core.autoscale.Autoscaler` is asked for a count from the backend's load
  (queued plus in-flight calls); a decision is logged and applied.
* **Health checks.** If the backend's class defines ``check_health()``, every
  ``health_check_period_s`` each replica in service is asked (a call that bypasses the queue).
  A check that raises, or does not answer within ``health_check_timeout_s``, takes the replica
  out of rotation: the calls it holds may finish (one drain time), a replacement starts, and
  the failure is counted. One check per replica at a time.
"""

from __future__ import annotations

import inspect
import logging
import threading
from concurrent.futures import Future
from typing import Any, Protocol

from .autoscale import DECISION_PERIOD_S, Autoscaler
from .clock import Clock, Timer
from .config import BackendConfig
from .executors.base import Call, Outcome, Replica

log = logging.getLogger("serve_core")

HEALTH_METHOD = "check_health"


def health_call() -> Call:
    """The call that asks a replica for its health."""
    return Call(HEALTH_METHOD, False, False, (None,), ({},))


def checks_health(target: Any) -> bool:
    """Whether a backend target is a class defining ``check_health()``."""
    return inspect.isclass(target) and callable(getattr(target, HEALTH_METHOD, None))


class Supervised(Protocol):
    """What a supervisor needs of a backend's runtime."""

    tag: str

    @property
    def config(self) -> BackendConfig: ...

    @property
    def target_replicas(self) -> int:
        """The replica count the runtime is keeping."""
        ...

    def ongoing(self) -> int:
        """Queries queued or in flight."""
        ...

    def in_service(self) -> list[Replica]: ...

    def resize_later(self, count: int) -> None:
        """Scale to ``count`` replicas, from a helper thread."""
        ...

    def evict_later(self, replica: Replica, reason: str) -> None:
        """Take ``replica`` out of rotation, drain it and replace it, from a helper thread."""
        ...


class Supervisor:
    """The timers of one backend: autoscaling (when configured) and health checks (when defined)."""

    def __init__(self, runtime: Supervised, clock: Clock, health_checked: bool) -> None:
        self._runtime = runtime
        self._clock = clock
        self._health_checked = health_checked
        self._lock = threading.Lock()
        self._stopped = False
        self._scale_timer: Timer | None = None
        self._health_timer: Timer | None = None
        self._autoscaler: Autoscaler | None = None
        self._checking: set[str] = set()  # replica ids with a check in flight
        self.health_failures = 0

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self.reconfigure(self._runtime.config)
        if self._health_checked:
            self._arm_health()

    def reconfigure(self, config: BackendConfig) -> None:
        """Follow a new config: autoscaling on, off, or with other bounds."""
        with self._lock:
            if self._stopped:
                return
            autoscaling = config.autoscaling
            if autoscaling is None:
                self._autoscaler = None
                if self._scale_timer is not None:
                    self._scale_timer.cancel()
                    self._scale_timer = None
                return
            if self._autoscaler is None or self._autoscaler.config != autoscaling:
                self._autoscaler = Autoscaler(autoscaling)
            if self._scale_timer is None:
                self._scale_timer = self._clock.call_later(DECISION_PERIOD_S, self._decide)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            for timer in (self._scale_timer, self._health_timer):
                if timer is not None:
                    timer.cancel()

    # -------------------------------------------------------------- autoscaling
    def _decide(self) -> None:
        with self._lock:
            autoscaler = self._autoscaler
            if self._stopped or autoscaler is None:
                return
            self._scale_timer = self._clock.call_later(DECISION_PERIOD_S, self._decide)
        runtime = self._runtime
        current, ongoing = runtime.target_replicas, runtime.ongoing()
        count = autoscaler.decide(self._clock.monotonic(), ongoing, current)
        if count is not None and count != current:
            log.info(
                "backend %r: autoscaling from %d to %d replicas (%d calls queued or in flight, target %g per replica)",
                runtime.tag, current, count, ongoing, autoscaler.config.target_ongoing_requests,
            )
            runtime.resize_later(count)

    # ------------------------------------------------------------ health checks
    def _arm_health(self) -> None:
        with self._lock:
            if not self._stopped:
                period = self._runtime.config.health_check_period_s
                self._health_timer = self._clock.call_later(period, self._check_all)

    def _check_all(self) -> None:
        self._arm_health()
        for replica in self._runtime.in_service():
            with self._lock:
                if self._stopped or replica.replica_id in self._checking:
                    continue
                self._checking.add(replica.replica_id)
            self._check(replica)

    def _check(self, replica: Replica) -> None:
        settled = threading.Lock()  # the answer and the timeout race: the first one counts
        timeout = self._runtime.config.health_check_timeout_s

        def finish(healthy: bool, why: str) -> None:
            if not settled.acquire(blocking=False):
                return
            timer.cancel()
            if not healthy and not any(r is replica for r in self._runtime.in_service()):
                healthy = True  # it died or was retired meanwhile: not a failed check
            with self._lock:
                self._checking.discard(replica.replica_id)
                stopped = self._stopped
                if not healthy and not stopped:
                    self.health_failures += 1
            if not healthy and not stopped:
                log.warning("backend %r: replica %s is unhealthy (%s); replacing it", self._runtime.tag,
                            replica.replica_id, why)
                self._runtime.evict_later(replica, why)

        def answered(future: Future[list[Outcome]]) -> None:
            try:
                (outcome,) = future.result()
            except BaseException as exc:  # noqa: BLE001 - the replica could not answer at all
                finish(False, f"the check could not run: {exc!r}")
                return
            finish(outcome.ok, "" if outcome.ok else f"check_health raised {outcome.value!r}")

        timer = self._clock.call_later(timeout, lambda: finish(False, f"check_health took over {timeout} s"))
        try:
            future = replica.submit(health_call())
        except BaseException as exc:  # noqa: BLE001 - a replica that cannot take the call is unhealthy
            finish(False, f"the check could not be sent: {exc!r}")
            return
        future.add_done_callback(answered)

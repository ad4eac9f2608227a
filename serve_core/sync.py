"""Keeping an instance in step with its store: the watcher thread and the instance records.

Every instance attached to a store runs one :class:`RegistryWatcher`. Its thread wakes on a
clock timer every ``registry_poll_s`` (and at once when the store notifies a commit:
PostgreSQL ``LISTEN/NOTIFY``, or another instance on the same memory store) and calls the
instance's step: write a heartbeat when one is due, and converge when the store's revision
has moved. The work runs on the watcher's own thread, never on the clock's, so a slow store
cannot hold up deadlines. Convergence is level-triggered: a missed notification only delays
it to the next poll.

An instance's record (``instance/<id>`` in the store, :class:`InstanceRecord`) says who it is,
where it serves HTTP, which registry revision it has applied, and its replicas per backend;
records not refreshed for ``instance_expiry_s`` are dropped by the next live instance's
heartbeat and never listed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .clock import Clock, Timer

if TYPE_CHECKING:
    from .persistence import RegistryStore

log = logging.getLogger("serve_core")

WAKE_BOUND_S = 5.0  # the watcher thread looks up at least this often, whatever the clock does
BEAT_BATCH = 8  # a record of more backends than this is written once every size/BEAT_BATCH changes
STOP_TIMEOUT_S = 30.0  # how long stop() waits for a step in progress (one convergence) to end


@dataclasses.dataclass(frozen=True)
class InstanceRecord:
    """One serving instance, as it records itself in the store.

    Attributes:
        instance_id: ``<host>-<pid>-<random>``.
        host, pid: where it runs.
        http: ``"host:port"`` of its standalone HTTP server, or ``None``.
        executor: its default executor's name.
        started, last_seen: wall-clock seconds (heartbeat).
        revision: the registry revision it has applied.
        backends: ``{tag: {"desired": n, "running": n}}`` replicas.
    """

    instance_id: str
    host: str
    pid: int
    http: str | None
    executor: str
    started: float
    last_seen: float
    revision: int
    backends: dict[str, dict[str, int]]

    def to_json(self) -> dict[str, Any]:
        # Not dataclasses.asdict: its deep copy of ``backends`` cost 10 ms per 1,000 backends.
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {**fields, "backends": {tag: dict(counts) for tag, counts in self.backends.items()}}

    def describe(self, now: float) -> dict[str, Any]:
        """What ``serve-core status`` and the dashboard show of it (``now``: wall-clock seconds)."""
        return {
            "id": self.instance_id,
            "host": self.host,
            "pid": self.pid,
            "http": self.http,
            "executor": self.executor,
            "revision": self.revision,
            "last_seen_s": round(max(0.0, now - self.last_seen), 1),
            "backends": self.backends,
        }

    @classmethod
    def from_json(cls, value: Any) -> InstanceRecord | None:
        """The record, or ``None`` for one that is not well formed (skipped)."""
        try:
            return cls(
                instance_id=str(value["instance_id"]),
                host=str(value["host"]),
                pid=int(value["pid"]),
                http=None if value.get("http") is None else str(value["http"]),
                executor=str(value["executor"]),
                started=float(value["started"]),
                last_seen=float(value["last_seen"]),
                revision=int(value["revision"]),
                backends={str(k): {str(a): int(b) for a, b in v.items()} for k, v in dict(value["backends"]).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            return None


def live_instances(records: dict[str, Any], now: float, expiry_s: float) -> tuple[list[InstanceRecord], list[str]]:
    """The live instances among stored ``instance/`` records (oldest first), and the ids of expired ones."""
    live, expired = [], []
    for key, value in records.items():
        record = InstanceRecord.from_json(value)
        if record is None or now - record.last_seen > expiry_s:
            expired.append(key)
        else:
            live.append(record)
    return sorted(live, key=lambda r: (r.started, r.instance_id)), expired


class InstanceBeacon:
    """This instance's ``instance/<id>`` record: refreshed every ``heartbeat_s`` (or at once when
    :meth:`stale`), and the records of dead instances swept every ``expiry_s``.

    Args:
        store: the registry's store.
        clock: heartbeat times (monotonic) and record times (wall).
        instance_id: this instance's id.
        heartbeat_s, expiry_s: see ``Serve``'s options of the same names.
    """

    def __init__(
        self, store: RegistryStore, clock: Clock, instance_id: str, heartbeat_s: float, expiry_s: float
    ) -> None:
        self._store = store
        self._clock = clock
        self.instance_id = instance_id
        self._heartbeat_s = heartbeat_s
        self.expiry_s = expiry_s
        self._started = clock.wall()
        self._next_beat = -math.inf
        self._next_sweep = -math.inf
        self._changes = 0  # revisions applied since the record was written

    def stale(self, size: int = 0) -> None:
        """What the record says changed (a new revision applied): write it at the next :meth:`beat`.

        A record of ``size`` backends costs ``size`` to write: after a burst of changes it is
        written once every ``size / BEAT_BATCH`` of them (and at the heartbeat), so a change
        costs O(1) amortised however many backends there are.
        """
        self._changes += 1
        if self._changes * BEAT_BATCH >= size:
            self._next_beat = -math.inf

    def due(self) -> bool:
        """Whether :meth:`beat` would write the record now."""
        return self._clock.monotonic() >= self._next_beat

    def beat(
        self, *, http: str | None, executor: str, revision: int, backends: dict[str, dict[str, int]],
        force: bool = False,
    ) -> None:
        """Write the record if a heartbeat is due (or ``force``), and sweep dead ones when that is due."""
        now = self._clock.monotonic()
        if not force and now < self._next_beat:
            return
        self._next_beat = now + self._heartbeat_s
        self._changes = 0
        record = InstanceRecord(
            instance_id=self.instance_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            http=http,
            executor=executor,
            started=self._started,
            last_seen=self._clock.wall(),
            revision=revision,
            backends=backends,
        )
        self._store.save_instance(self.instance_id, record.to_json())
        if now >= self._next_sweep:  # dead instances' records: swept by whoever is alive
            self._next_sweep = now + self.expiry_s
            self._sweep()

    def _sweep(self) -> None:
        _, expired = live_instances(self._store.instance_records(), self._clock.wall(), self.expiry_s)
        expired = [instance_id for instance_id in expired if instance_id != self.instance_id]
        if expired:
            log.info("serve_core: instances %s stopped sending heartbeats; removing their records", expired)
            self._store.drop_instances(expired)

    def live(self) -> list[InstanceRecord]:
        """The live instances on the store (this one included), oldest first."""
        live, _ = live_instances(self._store.instance_records(), self._clock.wall(), self.expiry_s)
        return live

    def remove(self) -> None:
        """Drop this instance's record (on shutdown: gone from ``serve-core status`` at once)."""
        self._store.drop_instances([self.instance_id])


class RegistryWatcher:
    """Runs ``step()`` on a thread of its own every ``poll_s`` of ``clock``, and whenever :meth:`wake` is called.

    Args:
        clock: whose timers pace the polls.
        poll_s: seconds between polls.
        step: the work (heartbeat, convergence); its errors are logged, the watcher goes on.
    """

    def __init__(self, clock: Clock, poll_s: float, step: Callable[[], None]) -> None:
        self._clock = clock
        self._poll_s = poll_s
        self._step = step
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._stopping = False
        self._timer: Timer | None = None
        self._thread = threading.Thread(target=self._run, name="serve-registry-watch", daemon=True)

    def start(self) -> None:
        self._arm()
        self._thread.start()

    def wake(self) -> None:
        """Step soon (from any thread; takes no lock the step holds)."""
        self._event.set()

    def _arm(self) -> None:
        with self._lock:
            if not self._stopping:
                self._timer = self._clock.call_later(self._poll_s, self._tick)

    def _tick(self) -> None:
        self._event.set()
        self._arm()

    def _run(self) -> None:
        failing = False
        while True:
            self._event.wait(WAKE_BOUND_S)
            self._event.clear()
            with self._lock:
                if self._stopping:
                    return
            try:
                self._step()
            except Exception:  # noqa: BLE001 - a failed step (store down...) is retried at the next poll
                if not failing:
                    log.exception("serve_core: registry watcher step failed; retrying at every poll")
                failing = True
            else:
                if failing:
                    log.info("serve_core: registry watcher recovered")
                failing = False

    def stop(self) -> None:
        """Stop polling; waits for a step in progress. Idempotent."""
        with self._lock:
            self._stopping = True
            if self._timer is not None:
                self._timer.cancel()
        self._event.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(STOP_TIMEOUT_S)

"""A backend's routing state: its queue, its replica slots and its metrics.

Each replica has one :class:`Slot`: idle, busy with one call (whose queries the slot
remembers until they are answered), or retired (draining its last call). The owner,
the router, serialises every method here under its lock.
"""

from __future__ import annotations

import collections
from concurrent.futures import Future

from .config import BackendConfig
from .executors.base import Replica
from .metrics import Counter, WindowedHistogram
from .queues import BackendQueue, Query


class Slot:
    """A replica and the call it runs, if any."""

    __slots__ = ("replica", "queries", "draining", "drained")

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.queries: list[Query] | None = None  # the call in flight
        self.draining = False
        self.drained: Future[None] = Future()  # resolves once a retired slot is idle

    @property
    def busy(self) -> bool:
        return self.queries is not None

    def mark_drained(self) -> None:
        if not self.drained.done():
            self.drained.set_result(None)


class BackendState:
    """Queue, slots and metrics of one backend."""

    def __init__(self, tag: str, config: BackendConfig, gc_window_seconds: float) -> None:
        self.tag = tag
        self.config = config
        self.queue = BackendQueue(config.max_queue_size)
        self.slots: list[Slot] = []  # serving slots, oldest first
        self.idle: collections.deque[Slot] = collections.deque()
        self.busy: set[Slot] = set()  # includes retired slots still finishing a call
        self.broken: BaseException | None = None  # why it has no replica, when restarting failed
        self.requests = Counter()
        self.errors = Counter()
        self.latency = WindowedHistogram(gc_window_seconds)

    def add(self, replica: Replica) -> None:
        slot = Slot(replica)
        self.slots.append(slot)
        self.idle.append(slot)
        self.broken = None

    def start(self, queries: list[Query]) -> Slot:
        """Give the next idle slot a call."""
        slot = self.idle.popleft()
        slot.queries = queries
        self.busy.add(slot)
        return slot

    def finish(self, slot: Slot) -> None:
        """The slot's call ended: it becomes idle again, or drained if retired."""
        slot.queries = None
        self.busy.discard(slot)
        if slot.draining:
            slot.mark_drained()
        elif slot in self.slots:
            self.idle.append(slot)

    def drop(self, slot: Slot) -> None:
        """Forget a slot whose replica died."""
        slot.queries = None
        self.busy.discard(slot)
        if slot in self.slots:
            self.slots.remove(slot)
        if slot in self.idle:
            self.idle.remove(slot)
        slot.mark_drained()

    def retire(self, count: int, oldest: bool) -> list[Slot]:
        """Stop giving ``count`` slots work (the newest unless ``oldest``)."""
        cut = slice(0, count) if oldest else slice(len(self.slots) - count, None)
        retired = self.slots[cut]
        del self.slots[cut]
        for slot in retired:
            slot.draining = True
            if slot in self.idle:
                self.idle.remove(slot)
            if not slot.busy:
                slot.mark_drained()
        return retired

    def in_flight(self) -> list[Query]:
        return [query for slot in self.busy for query in slot.queries or ()]

"""A backend's routing state: its queue, its replica slots and its metrics.

Each replica has one :class:`Slot`: idle, busy with up to ``max_concurrent_queries``
calls (whose queries it remembers until they are answered), or retired (draining its
last calls). The owner,
the router, serialises every method here under its lock.
"""

from __future__ import annotations

import collections
from concurrent.futures import Future

from .config import BackendConfig
from .executors.base import Replica
from .metrics import Counter, WindowedHistogram
from .queues import BackendQueue, Query


def capacity(config: BackendConfig, replica: Replica) -> int:
    """Calls ``replica`` may hold: the config's ``max_concurrent_queries``, else its executor's default."""
    if config.max_concurrent_queries is not None:
        return config.max_concurrent_queries
    return getattr(replica, "default_max_concurrent_queries", 1)


class Slot:
    """A replica and the calls it runs (at most ``capacity`` at once)."""

    __slots__ = ("replica", "capacity", "calls", "draining", "drained")

    def __init__(self, replica: Replica, capacity: int) -> None:
        self.replica = replica
        self.capacity = capacity
        self.calls: dict[int, list[Query]] = {}  # the calls in flight by id(), each a list of queries
        self.draining = False
        self.drained: Future[None] = Future()  # resolves once a retired slot is idle

    @property
    def busy(self) -> bool:
        return bool(self.calls)

    @property
    def full(self) -> bool:
        return len(self.calls) >= self.capacity

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
        # Seconds from arrival to answer, in the queue, and of a call on its replica; batch sizes.
        self.histograms = {
            name: WindowedHistogram(gc_window_seconds)
            for name in ("latency_s", "queue_wait_s", "execution_s", "batch_size")
        }
        self.latency = self.histograms["latency_s"]
        self.queue_wait = self.histograms["queue_wait_s"]
        self.execution = self.histograms["execution_s"]
        self.batch_size = self.histograms["batch_size"]

    def add(self, replica: Replica) -> None:
        slot = Slot(replica, capacity(self.config, replica))
        self.slots.append(slot)
        self.idle.append(slot)
        self.broken = None

    def set_capacity(self) -> None:
        """Apply the config's ``max_concurrent_queries`` to every slot."""
        for slot in self.slots:
            slot.capacity = capacity(self.config, slot.replica)
        self.idle = collections.deque(slot for slot in self.slots if not slot.full)

    def start(self, queries: list[Query]) -> Slot:
        """Give the next slot with room a call (slots with room take turns)."""
        slot = self.idle.popleft()
        slot.calls[id(queries)] = queries
        self.busy.add(slot)
        if not slot.full:
            self.idle.append(slot)
        return slot

    def finish(self, slot: Slot, queries: list[Query]) -> None:
        """A call of the slot ended: it has room again, or is drained if retired and idle."""
        slot.calls.pop(id(queries), None)
        if not slot.calls:
            self.busy.discard(slot)
        if slot.draining:
            if not slot.calls:
                slot.mark_drained()
        elif not slot.full and slot in self.slots and slot not in self.idle:
            # Not "was full": after max_concurrent_queries was lowered a slot can stay full
            # through several finished calls, and must enter the idle list once.
            self.idle.append(slot)

    def drop(self, slot: Slot, queries: list[Query]) -> bool:
        """Forget a slot whose replica died or turned ``queries`` away.

        Its other calls stay listed until they are answered (shutdown can still fail
        them). Returns True the first time, if the slot was still serving: a replica
        holding several calls reports its death once per call, and only the first report
        asks for a replacement.
        """
        slot.calls.pop(id(queries), None)
        if not slot.calls:
            self.busy.discard(slot)
            slot.mark_drained()
        serving = slot in self.slots
        if serving:
            self.slots.remove(slot)
        if slot in self.idle:
            self.idle.remove(slot)
        return serving

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
        return [query for slot in self.busy for call in slot.calls.values() for query in call]

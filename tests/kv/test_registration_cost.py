"""Registering one more endpoint and backend costs the same store work with 30 or 300 already there.

Counts, not times: the store operations a registration makes from the calling thread (the
registry watcher's own polls are left out), the records it reads and writes, and the routing
policies it builds. Before the registry was kept incrementally, each change read and checked
every record (one ``as_dict`` per read of the registry), and each new backend rebuilt every
endpoint's policy.
"""

from __future__ import annotations

import collections
import random
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from serve_core import Serve
from serve_core.executors.base import ReplicaSpec
from serve_core.executors.inline import InlineExecutor, InlineReplica
from serve_core.kv.memory import MemoryKVStore
from serve_core.kv.sql import SQLKVStore
from serve_core.policy import PolicySpec, RandomPolicy
from serve_core.split import Traffic
from serve_core.sync import BEAT_BATCH
from serve_core.testing import FakeClock

from ..conftest import WAIT
from .backends import echo

MakeServe = Callable[..., Serve]


class _Counts:
    """Store calls made by one thread, the records they wrote, and the backends in heartbeats written."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.calls: collections.Counter[str] = collections.Counter()

    def count(self, name: str, amount: int = 1) -> None:
        if threading.get_ident() == self.thread:
            self.calls[name] += amount

    def written(self, items: Mapping[str, Any]) -> None:
        for key, value in items.items():
            if key.startswith("instance/"):
                self.count("heartbeat backends", len(value["backends"]))
            else:
                self.count("records written")


class CountingMemoryStore(MemoryKVStore):
    def __init__(self, namespace: str, counts: _Counts) -> None:
        super().__init__(namespace)
        self.counts = counts

    def get(self, key: str, default: Any = None) -> Any:
        self.counts.count("get")
        return super().get(key, default)

    def as_dict(self) -> dict[str, Any]:
        self.counts.count("as_dict")
        return super().as_dict()

    def update(self, items: Mapping[str, Any], delete: Iterable[str] = ()) -> None:
        self.counts.count("update")
        self.counts.written(items)
        super().update(items, delete)

    def compare_and_update(
        self, key: str, expected: Any, items: Mapping[str, Any], delete: Iterable[str] = ()
    ) -> bool:
        self.counts.count("compare_and_update")
        self.counts.written(items)
        return super().compare_and_update(key, expected, items, delete)


class CountingSQLStore(SQLKVStore):
    counts: _Counts

    def get(self, key: str, default: Any = None) -> Any:
        self.counts.count("get")
        return super().get(key, default)

    def as_dict(self) -> dict[str, Any]:
        self.counts.count("as_dict")
        return super().as_dict()

    def update(self, items: Mapping[str, Any], delete: Iterable[str] = ()) -> None:
        self.counts.count("update")
        self.counts.written(items)
        super().update(items, delete)

    def compare_and_update(
        self, key: str, expected: Any, items: Mapping[str, Any], delete: Iterable[str] = ()
    ) -> bool:
        self.counts.count("compare_and_update")
        self.counts.written(items)
        return super().compare_and_update(key, expected, items, delete)


def _counting_policy(counts: _Counts) -> PolicySpec:
    class CountingPolicy(RandomPolicy):
        def __init__(self, traffic: Traffic, rng: random.Random) -> None:
            counts.count("policies built")
            super().__init__(traffic, rng)

    return PolicySpec("Counting", CountingPolicy)


def _register(srv: Serve, first: int, count: int) -> None:
    for i in range(first, first + count):
        srv.create_endpoint(f"e{i}", f"/e{i}")
        srv.create_backend(echo, f"b{i}")
        srv.link(f"e{i}", f"b{i}")


def _cost(make_store: Callable[[_Counts], Any], make_serve: MakeServe, existing: int, more: int) -> dict[str, int]:
    """What registering ``more`` endpoint+backend pairs costs after ``existing`` of them."""
    counts = _Counts()
    store = make_store(counts)
    srv = make_serve(
        kv_store_connector=lambda namespace: store,
        executor="inline",
        clock=FakeClock(),
        queueing_policy=_counting_policy(counts),
        allow_unsigned_store=True,
    )
    _register(srv, 0, existing)
    counts.calls.clear()
    _register(srv, existing, more)
    assert srv.get_handle(f"e{existing + more - 1}").remote(name="last").result(WAIT) == "echo last"
    assert len(srv.route_table()) == existing + more
    return dict(counts.calls)


def _memory(counts: _Counts) -> MemoryKVStore:
    return CountingMemoryStore("registry", counts)


@pytest.mark.parametrize("store_kind", ["memory", "sqlite"])
def test_a_registration_does_the_same_store_work_whatever_the_registry_holds(
    store_kind: str, make_serve: MakeServe, tmp_path: Path
) -> None:
    def sqlite(counts: _Counts) -> SQLKVStore:
        store = CountingSQLStore(f"sqlite:///{tmp_path / f'r{len(list(tmp_path.iterdir()))}.db'}", "registry")
        store.counts = counts
        return store

    make_store = _memory if store_kind == "memory" else sqlite
    small = _cost(make_store, make_serve, existing=30, more=20)
    large = _cost(make_store, make_serve, existing=300, more=20)
    registry_work = ("get", "as_dict", "compare_and_update", "records written", "policies built")
    assert {k: small.get(k, 0) for k in registry_work} == {k: large.get(k, 0) for k in registry_work}
    assert large.get("as_dict", 0) == 0  # the registry is never read whole
    assert large["compare_and_update"] == 3 * 20  # one commit per change, each change one write
    assert large["policies built"] == 20  # the new endpoint's, not one per endpoint per new backend


def test_the_instance_record_costs_o1_amortised_per_change(make_serve: MakeServe) -> None:
    # The heartbeat record lists every backend; after a change it is written at once only
    # every size/BEAT_BATCH changes (and at every heartbeat), so per change it stays bounded.
    for existing in (30, 300):
        cost = _cost(_memory, make_serve, existing=existing, more=60)
        changes = cost["compare_and_update"]
        assert cost.get("heartbeat backends", 0) <= 2 * BEAT_BATCH * changes


def test_a_small_registry_records_every_change_in_the_instance_record_at_once(make_serve: MakeServe) -> None:
    srv = make_serve(executor="inline", clock=FakeClock())
    srv.create_endpoint("e", "/e")
    srv.create_backend(echo, "b")
    srv.link("e", "b")
    (record,) = srv.instances()
    assert record.revision == srv.revision and "b" in record.backends


class _CountingInline(InlineExecutor):
    started = 0

    def start_replica(self, spec: ReplicaSpec) -> InlineReplica:
        self.started += 1
        return super().start_replica(spec)


class _RacedStore(MemoryKVStore):
    """Another writer commits once just before this instance's first backend commit."""

    raced = False

    def compare_and_update(
        self, key: str, expected: Any, items: Mapping[str, Any], delete: Iterable[str] = ()
    ) -> bool:
        if not self.raced and any(name.startswith("backend/") for name in items):
            self.raced = True
            super().compare_and_update(key, expected, {key: (expected or 0) + 1, "other/key": 1})
        return super().compare_and_update(key, expected, items, delete)


def test_a_backend_commit_beaten_by_another_writer_keeps_its_started_replicas(make_serve: MakeServe) -> None:
    store, executor = _RacedStore("registry"), _CountingInline()
    srv = make_serve(kv_store_connector=lambda namespace: store, executor=executor, allow_unsigned_store=True)
    srv.create_backend(echo, "echo:v1")
    assert store.raced  # the first commit lost: the second attempt committed
    assert executor.started == 1  # the replica started for the first attempt served the second
    srv.create_endpoint("echo")
    srv.link("echo", "echo:v1")
    assert srv.get_handle("echo").remote(name="raced").result(WAIT) == "echo raced"

"""Replica slots: how many calls each replica is given."""

from __future__ import annotations

from typing import Any

from serve_core import BackendConfig
from serve_core.slots import BackendState


class _Replica:
    replica_id = "r#1"
    alive = True
    default_max_concurrent_queries = 8

    def submit(self, call: Any) -> Any:
        raise AssertionError("slots never call replicas")

    def stop(self, drain_timeout: float | None = None) -> None:
        pass


def _calls(count: int) -> list[list[Any]]:
    return [[object()] for _ in range(count)]


def test_capacity_is_the_config_else_the_replicas_default() -> None:
    state = BackendState("b", BackendConfig(), 10.0)
    state.add(_Replica())
    assert state.slots[0].capacity == 8
    state.config = BackendConfig(max_concurrent_queries=2)
    state.set_capacity()
    assert state.slots[0].capacity == 2


def test_lowered_capacity_holds_once_the_calls_in_flight_drain() -> None:
    state = BackendState("b", BackendConfig(max_concurrent_queries=4), 10.0)
    state.add(_Replica())
    held = _calls(4)
    (slot,) = {state.start(call) for call in held}
    assert not state.idle
    state.config = BackendConfig(max_concurrent_queries=1)
    state.set_capacity()
    for call in held[:3]:  # still at or above the new capacity after each
        state.finish(slot, call)
        assert not state.idle
    state.finish(slot, held[3])
    assert list(state.idle) == [slot]  # room for one call, listed once
    state.start(_calls(1)[0])
    assert not state.idle and len(slot.calls) == 1

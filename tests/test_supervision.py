"""Autoscaling, health checks, warm-up and readiness: the supervisor's timers on the fake clock."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from serve_core import AutoscalingConfig, BackendConfig, Serve, ValidationError
from serve_core.autoscale import DECISION_PERIOD_S, Autoscaler
from serve_core.kv.memory import MemoryKVStore
from serve_core.testing import FakeClock

from .conftest import WAIT
from .procs import wait_until
from .scripted import ScriptedExecutor

MakeServe = Callable[..., Serve]


def answer(*, i: int = 0) -> int:
    return i


# ------------------------------------------------------------------ the decision
def test_the_autoscaler_waits_for_its_delays_and_clamps() -> None:
    scaler = Autoscaler(AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=2,
                                          upscale_delay_s=3, downscale_delay_s=10))
    assert [scaler.wanted(n) for n in (0, 1, 2, 3, 8, 100)] == [1, 1, 1, 2, 4, 4]
    assert scaler.decide(0.0, 7, current=1) is None  # wants 4, for 0 s so far
    assert scaler.decide(2.0, 7, current=1) is None
    assert scaler.decide(3.0, 5, current=1) == 3  # held 3 s: the latest load decides
    assert scaler.decide(4.0, 0, current=3) is None  # wants fewer now: a new wait starts
    assert scaler.decide(8.0, 6, current=3) is None  # a break in the wish resets it
    assert scaler.decide(9.0, 0, current=3) is None
    assert scaler.decide(18.9, 0, current=3) is None
    assert scaler.decide(19.0, 0, current=3) == 1


def test_autoscaling_and_num_replicas_are_exclusive() -> None:
    with pytest.raises(ValidationError, match="mutually exclusive"):
        BackendConfig(num_replicas=3, autoscaling=AutoscalingConfig(max_replicas=5))
    with pytest.raises(ValidationError, match="max_replicas"):
        AutoscalingConfig(min_replicas=3, max_replicas=2)
    config = BackendConfig(autoscaling=AutoscalingConfig(min_replicas=2, max_replicas=5))
    assert BackendConfig.from_dict(config.to_dict()) == config  # persists with the config


# ------------------------------------------------------------------ autoscaling
@pytest.fixture
def scripted(make_serve: MakeServe) -> Iterator[tuple[Serve, ScriptedExecutor, FakeClock]]:
    clock, executor = FakeClock(), ScriptedExecutor()
    srv = make_serve(executor=executor, clock=clock, drain_timeout_s=0.05)
    srv.create_endpoint("ep")
    yield srv, executor, clock


def _helpers_done() -> bool:
    return not any(t.name.startswith(("serve-scale-", "serve-evict-", "serve-replace-")) for t in threading.enumerate())


def _tick(clock: FakeClock, seconds: float) -> None:
    """Advance one decision at a time, letting each decision's scaling finish before the next."""
    for _ in range(round(seconds / DECISION_PERIOD_S)):
        clock.advance(DECISION_PERIOD_S)
        assert wait_until(_helpers_done, WAIT)


def test_autoscaling_follows_the_load_up_and_back_down(
    scripted: tuple[Serve, ScriptedExecutor, FakeClock],
) -> None:
    srv, executor, clock = scripted
    autoscaling = AutoscalingConfig(min_replicas=1, max_replicas=3, target_ongoing_requests=1,
                                    upscale_delay_s=2, downscale_delay_s=5)
    srv.create_backend(answer, "b", backend_config=BackendConfig(autoscaling=autoscaling))
    srv.link("ep", "b")
    assert len(srv.replica_ids("b")) == 1  # starts at min_replicas
    handle = srv.get_handle("ep")
    futures = [handle.remote(i=i) for i in range(5)]  # held by the scripted replicas: sustained load
    _tick(clock, 1)
    assert len(srv.replica_ids("b")) == 1  # wanted 3 for 1 s of the 2 s delay
    _tick(clock, 2)
    assert len(srv.replica_ids("b")) == 3
    assert srv.stat()["backend_b_num_replicas"] == 3
    while executor.held():  # the load goes away
        executor.held()[0].complete()
    assert [f.result(WAIT) for f in futures] == list(range(5))
    _tick(clock, 4)
    assert len(srv.replica_ids("b")) == 3  # not for the 5 s of downscale_delay_s yet
    _tick(clock, 2)
    assert len(srv.replica_ids("b")) == 1
    assert srv.get_backend_config("b").autoscaling == autoscaling  # the config is not rewritten


def test_a_config_with_other_bounds_clamps_the_running_count(
    scripted: tuple[Serve, ScriptedExecutor, FakeClock],
) -> None:
    srv, _, _ = scripted
    srv.create_backend(answer, "b", backend_config=BackendConfig(autoscaling=AutoscalingConfig(min_replicas=1)))
    srv.set_backend_config("b", BackendConfig(autoscaling=AutoscalingConfig(min_replicas=2, max_replicas=4)))
    assert len(srv.replica_ids("b")) == 2
    srv.set_backend_config("b", BackendConfig(num_replicas=3))  # back to a fixed count
    assert len(srv.replica_ids("b")) == 3


def slow(*, gate: Any = None) -> str:
    gate.wait(WAIT)
    return "done"


def test_autoscaling_for_real(
    make_serve: MakeServe, make_gate: Callable[[], Any], concurrent_executor: str
) -> None:
    """Once on the real clock: calls that hold their replicas raise the count, which falls once they end."""
    srv = make_serve(executor=concurrent_executor, drain_timeout_s=1.0)
    srv.create_endpoint("ep")
    autoscaling = AutoscalingConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=1,
                                    upscale_delay_s=0, downscale_delay_s=0)
    srv.create_backend(slow, "b", backend_config=BackendConfig(autoscaling=autoscaling))
    srv.link("ep", "b")
    gate = make_gate()
    futures = [srv.get_handle("ep").remote(gate=gate) for _ in range(3)]
    assert wait_until(lambda: len(srv.replica_ids("b")) == 2, 4 * WAIT)
    gate.set()
    assert [f.result(WAIT) for f in futures] == ["done"] * 3
    assert wait_until(lambda: len(srv.replica_ids("b")) == 1, 4 * WAIT)


# ---------------------------------------------------------------- health checks
class Flaky:
    """Healthy until told otherwise (the flag is shared by every replica of the test)."""

    sick = threading.Event()
    hang = threading.Event()
    released = threading.Event()
    warmed: list[str] = []

    def warmup(self) -> None:
        Flaky.warmed.append("warm")

    def check_health(self) -> None:
        if Flaky.hang.is_set():
            Flaky.released.wait(WAIT)
        if Flaky.sick.is_set():
            raise RuntimeError("out of memory")

    def __call__(self, request: Any = None) -> int:
        assert Flaky.warmed, "called before warmup() returned"
        return len(Flaky.warmed)


@pytest.fixture
def flaky() -> Iterator[type[Flaky]]:
    for flag in (Flaky.sick, Flaky.hang, Flaky.released):
        flag.clear()
    Flaky.warmed.clear()
    yield Flaky
    Flaky.released.set()


def test_a_failed_health_check_replaces_the_replica(make_serve: MakeServe, flaky: type[Flaky]) -> None:
    clock = FakeClock()
    srv = make_serve(executor="inline", clock=clock, drain_timeout_s=0.05)
    srv.create_endpoint("ep")
    srv.create_backend(flaky, "b", backend_config=BackendConfig(health_check_period_s=5))
    srv.link("ep", "b")
    first = srv.replica_ids("b")
    assert flaky.warmed == ["warm"]
    clock.advance(5)  # healthy: nothing changes
    assert wait_until(_helpers_done, WAIT) and srv.replica_ids("b") == first
    flaky.sick.set()
    clock.advance(5)
    assert wait_until(lambda: _helpers_done() and srv.replica_ids("b") != first, WAIT)
    assert len(srv.replica_ids("b")) == 1 and srv.stat()["backend_b_health_check_failures"] == 1
    assert flaky.warmed == ["warm", "warm"]  # the replacement warmed up before taking calls
    assert srv.get_handle("ep").remote().result(WAIT) == 2


def test_a_health_check_that_hangs_times_out(make_serve: MakeServe, flaky: type[Flaky]) -> None:
    clock = FakeClock()
    srv = make_serve(executor="thread", clock=clock, drain_timeout_s=0.05)
    srv.create_endpoint("ep")
    config = BackendConfig(health_check_period_s=5, health_check_timeout_s=2)
    srv.create_backend(flaky, "b", backend_config=config)
    first = srv.replica_ids("b")
    flaky.hang.set()
    clock.advance(5)  # the check starts, and does not answer
    clock.advance(2)  # its timeout
    assert wait_until(lambda: _helpers_done() and srv.replica_ids("b") != first, WAIT)
    assert srv.stat()["backend_b_health_check_failures"] == 1
    flaky.released.set()


# ------------------------------------------------------------------- readiness
class SlowStart:
    """The first replica starts at once; later ones wait for the gate."""

    gate = threading.Event()
    started = 0

    def __init__(self) -> None:
        SlowStart.started += 1
        if SlowStart.started > 1:
            SlowStart.gate.wait(WAIT)

    def __call__(self, request: Any = None) -> str:
        return "up"


def test_readiness_waits_for_a_slow_constructor(make_serve: MakeServe) -> None:
    store = MemoryKVStore("registry")
    SlowStart.gate.clear()
    SlowStart.started = 0
    one = make_serve(kv_store_connector=lambda ns: store, executor="thread")
    other = make_serve(kv_store_connector=lambda ns: store, executor="thread", registry_poll_s=3600)
    one.create_endpoint("ep", "/ep")
    one.create_backend(SlowStart, "b")  # `other` is told, and starts its replica: it waits
    one.link("ep", "b")
    assert other.readiness() == {"ready": False, "not_ready": {"ep": "b: not started here"}}
    SlowStart.gate.set()
    assert wait_until(lambda: other.readiness()["ready"], WAIT)
    assert other.get_handle("ep").remote().result(WAIT) == "up"


def test_readiness_fails_when_every_replica_of_a_linked_backend_is_broken(
    scripted: tuple[Serve, ScriptedExecutor, FakeClock],
) -> None:
    srv, executor, _ = scripted
    srv.create_backend(answer, "b")
    srv.link("ep", "b")
    assert srv.readiness()["ready"]
    future = srv.get_handle("ep").remote(i=1)
    executor.failing_starts = 1
    executor.held()[0].crash()
    assert wait_until(_helpers_done, WAIT)
    with pytest.raises(Exception, match="crashed"):
        future.result(WAIT)
    assert srv.readiness() == {"ready": False, "not_ready": {"ep": "b: no replica ready"}}


def test_readyz_over_http(make_serve: MakeServe) -> None:
    from werkzeug.test import Client

    executor = ScriptedExecutor()
    srv = make_serve(executor=executor, drain_timeout_s=0.05)
    client = Client(srv.wsgi_app())
    assert client.get("/-/readyz").status_code == 200  # nothing with traffic: nothing to wait for
    srv.create_endpoint("ep", "/ep")
    srv.create_backend(answer, "b")
    srv.link("ep", "b")
    ready = client.get("/-/readyz")
    assert ready.status_code == 200 and ready.get_json() == {"ready": True, "not_ready": {}}
    executor.failing_starts = 1
    future = srv.get_handle("ep").remote(i=1)
    executor.held()[0].crash()
    assert wait_until(_helpers_done, WAIT) and future.exception(WAIT) is not None
    broken = client.get("/-/readyz")
    assert broken.status_code == 503 and broken.get_json()["not_ready"] == {"ep": "b: no replica ready"}
    assert client.get("/-/healthz").status_code == 200  # the process still serves

"""The dashboard's history: a sampler on the instance's clock, rates and latency per point, bounded memory."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from serve_core import NotFoundError, Serve
from serve_core.history import FIELDS, History
from serve_core.testing import FakeClock


class FakeSource:
    """A ``stat()`` whose counters the test sets (the ``StatSource`` protocol)."""

    def __init__(self) -> None:
        self.running = True
        self.stats: dict[str, float] = {}
        self.traffic: dict[str, dict[str, float]] = {}

    def stat(self, percentiles: Sequence[float] = (), agg_windows_seconds: Sequence[float] = ()) -> dict[str, float]:
        return dict(self.stats)

    def get_traffic_policy(self, endpoint_name: str) -> dict[str, float]:
        if endpoint_name not in self.traffic:
            raise NotFoundError(f"endpoint {endpoint_name!r} has no traffic yet")
        return self.traffic[endpoint_name]

    def backend(self, tag: str, requests: int, errors: int = 0, p99: float | None = None) -> None:
        self.stats.update({
            f"backend_{tag}_num_replicas": 1, f"{tag}_request_counter": requests, f"{tag}_error_counter": errors,
        })
        if p99 is not None:
            for p in (50, 95, 99):
                self.stats[f"{tag}_latency_s_{p}th_perc_1_window"] = p99 * p / 99


def test_a_long_run_keeps_at_most_the_configured_history() -> None:
    clock, source = FakeClock(), FakeSource()
    history = History(source, clock, interval_s=1.0, horizon_s=30.0)
    history.start()
    for second in range(1, 301):  # ten horizons; a new backend every 10 s, each gone 10 s later
        source.stats = {}
        source.backend(f"b{second // 10}", requests=second * 5)
        clock.advance(1.0)
    assert history.capacity == 30
    assert len(history) == 30
    points = history.points()
    assert [p.seq for p in points] == list(range(271, 301))  # the newest 30, in order
    series = history.series()
    assert len(series["t"]) == 30
    assert all(len(values) == 30 for tag in series["backends"] for values in series["backends"][tag].values())
    assert set(series["backends"]) <= {f"b{n}" for n in range(27, 31)}  # only backends seen in the window
    assert len(history._counters) <= 1  # counters of series gone from stat() are dropped
    history.stop()
    assert clock.pending == 0


def test_a_long_run_of_a_real_instance_on_the_fake_clock_stays_bounded(make_serve: Callable[..., Serve]) -> None:
    clock = FakeClock()
    srv = make_serve(executor="inline", clock=clock)
    srv.create_endpoint("echo", None)
    srv.create_backend(lambda: "hi", "echo:v1")
    srv.link("echo", "echo:v1")
    handle = srv.get_handle("echo")
    history = History(srv, clock, interval_s=1.0, horizon_s=60.0)
    history.start()
    for _ in range(400):
        for _ in range(3):
            handle.remote().result(1)
        clock.advance(1.0)
    assert len(history) == history.capacity == 60
    last = history.latest()
    assert last is not None
    rps, eps, p50, p95, p99 = last.backends["echo:v1"]
    assert rps == pytest.approx(3.0) and eps == 0.0
    assert p50 == p95 == p99 == 0.0  # the fake clock does not move during a call
    assert last.endpoints["echo"][:2] == (pytest.approx(3.0), 0.0)


def test_rates_come_from_counter_deltas_over_elapsed_time() -> None:
    clock, source = FakeClock(), FakeSource()
    history = History(source, clock, interval_s=2.0)
    source.backend("a", requests=10, errors=1)
    first = history.sample()
    assert first is not None and first.backends["a"][:2] == (None, None)  # no interval yet
    clock.advance(2.0)
    source.backend("a", requests=30, errors=5)
    second = history.sample()
    assert second is not None and second.backends["a"][:2] == (10.0, 2.0)
    clock.advance(2.0)
    source.backend("a", requests=4, errors=0)  # a new runtime (new code): counting from zero
    third = history.sample()
    assert third is not None and third.backends["a"][:2] == (2.0, 0.0)


def test_endpoint_latency_is_the_slowest_backend_with_traffic() -> None:
    clock, source = FakeClock(), FakeSource()
    history = History(source, clock)
    source.backend("fast", 1, p99=0.01)
    source.backend("slow", 1, p99=0.09)
    source.backend("unused", 1, p99=5.0)
    source.stats.update({"endpoint_e_request_counter": 2, "endpoint_e_error_counter": 0})
    source.stats.update({"endpoint_idle_request_counter": 0, "endpoint_idle_error_counter": 0})
    source.traffic["e"] = {"fast": 0.9, "slow": 0.1, "unused": 0.0}
    point = history.sample()
    assert point is not None
    assert point.endpoints["e"][4] == pytest.approx(0.09)
    assert point.endpoints["e"][2] == pytest.approx(0.09 * 50 / 99)
    assert point.endpoints["idle"][2:] == (None, None, None)  # no traffic yet


def test_series_since_returns_only_newer_points_as_columns() -> None:
    clock, source = FakeClock(), FakeSource()
    history = History(source, clock)
    for requests in (0, 3, 6):
        source.backend("a", requests)
        history.sample()
        clock.advance(1.0)
    full = history.series()
    assert full["seq"] == 3 and len(full["t"]) == 3
    assert set(full["backends"]["a"]) == set(FIELDS)
    assert full["backends"]["a"]["rps"] == [None, 3.0, 3.0]
    newer = history.series(since=2)
    assert newer["seq"] == 3 and len(newer["t"]) == 1 and newer["backends"]["a"]["rps"] == [3.0]
    assert history.series(since=3)["t"] == []


def test_the_sampler_stops_with_its_source_and_samples_only_while_asked() -> None:
    clock, source = FakeClock(), FakeSource()
    source.backend("a", 0)
    asked: list[Any] = []
    history = History(source, clock)
    history.start(when=lambda: bool(asked))
    clock.advance(5.0)
    assert len(history) == 0 and history.sampling  # armed, but told not to sample
    asked.append(True)
    clock.advance(3.0)
    assert len(history) == 3
    source.running = False
    clock.advance(3.0)
    assert not history.sampling and clock.pending == 0 and len(history) == 3


def test_a_shut_down_instance_stops_its_sampler(make_serve: Callable[..., Serve]) -> None:
    clock = FakeClock()
    srv = make_serve(executor="inline", clock=clock)
    history = History(srv, clock)
    history.start()
    clock.advance(2.0)
    assert len(history) == 2
    srv.shutdown()
    clock.advance(2.0)
    assert not history.sampling and len(history) == 2


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), True, "1"])
def test_bad_intervals_are_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="interval_s"):
        History(FakeSource(), FakeClock(), interval_s=bad)

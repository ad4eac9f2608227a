"""The dashboard's history: a sampler on the instance's clock, rates and latency per point, bounded memory."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from serve_core import NotFoundError, Serve
from serve_core.history import FIELDS, History, bucket_quantile
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


def test_endpoint_latency_comes_from_the_latency_buckets_of_the_interval() -> None:
    clock, source = FakeClock(), FakeSource()
    counts: dict[str, list[int]] = {"e": [0, 0, 0, 0]}
    history = History(source, clock, latency_counts=lambda: ((0.001, 0.01, 0.1), counts))
    source.backend("shared", 1, p99=0.09)  # the backend's own percentiles: not the endpoint's any more
    source.stats.update({"endpoint_e_request_counter": 0, "endpoint_e_error_counter": 0})
    source.traffic["e"] = {"shared": 1.0}
    first = history.sample()
    assert first is not None and first.endpoints["e"][2:] == (None, None, None)  # no interval yet
    counts["e"] = [0, 100, 0, 0]  # 100 calls between 1 and 10 ms
    clock.advance(1.0)
    second = history.sample()
    assert second is not None
    p50, p95, p99 = second.endpoints["e"][2:]
    assert p50 == pytest.approx(0.0055) and p95 == pytest.approx(0.00955) and p99 == pytest.approx(0.00991)
    assert second.backends["shared"][4] == pytest.approx(0.09)
    counts["e"] = [0, 100, 0, 10]  # then 10 calls past the last bound: read as the last bound
    clock.advance(1.0)
    third = history.sample()
    assert third is not None and third.endpoints["e"][2:] == (0.1, 0.1, 0.1)
    clock.advance(1.0)
    idle = history.sample()  # no call in the interval: not known
    assert idle is not None and idle.endpoints["e"][2:] == (None, None, None)


def test_a_real_instance_gives_each_endpoint_of_a_shared_backend_its_own_latency(
    make_serve: Callable[..., Serve],
) -> None:
    clock = FakeClock()
    srv = make_serve(executor="inline", clock=clock)

    def work(seconds: float = 0.0) -> str:
        clock.advance(seconds)  # the call takes this long on the instance's clock
        return "done"

    srv.create_backend(work, "work:v1")
    for name in ("quick", "slow"):
        srv.create_endpoint(name, None)
        srv.link(name, "work:v1")
    history = History(srv, clock, latency_counts=srv.metrics.latency_counts)
    history.sample()
    for _ in range(10):
        srv.get_handle("quick").remote(seconds=0.0002).result(1)
        srv.get_handle("slow").remote(seconds=0.2).result(1)
    clock.advance(1.0)
    point = history.sample()
    assert point is not None
    quick, slow = point.endpoints["quick"][2:], point.endpoints["slow"][2:]
    assert all(value is not None and 0 < value <= 0.0005 for value in quick)  # the first bucket
    assert all(value is not None and 0.1 < value <= 0.25 for value in slow)  # the 100-250 ms bucket
    assert point.backends["work:v1"][4] == pytest.approx(0.2)  # the backend's p99: both endpoints' calls


def test_bucket_quantile_interpolates_within_the_bucket() -> None:
    bounds = (1.0, 2.0, 4.0)
    assert bucket_quantile(bounds, [10, 0, 0, 0], 0.5) == 0.5
    assert bucket_quantile(bounds, [5, 5, 0, 0], 0.5) == 1.0
    assert bucket_quantile(bounds, [5, 5, 0, 0], 0.99) == pytest.approx(1.98)
    assert bucket_quantile(bounds, [0, 0, 0, 3], 0.5) == 4.0
    assert bucket_quantile(bounds, [0, 0, 0, 0], 0.5) is None
    assert bucket_quantile(bounds, [1, -1, 0, 0], 0.5) is None  # counts that went back: not known


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

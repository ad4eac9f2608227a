"""Prometheus metrics recorded by the core (serve_core.prom) and exported by serve_core.http.metrics.

Counts are exact: the tests run on the inline or scripted executor with a fake clock, make
a known number of calls and parse the exposition with prometheus-client's own parser.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from serve_core import BackendConfig, Serve, accept_batch
from serve_core.errors import BackPressureError, NotFoundError, ServeStateError, ServeTypeError, ValidationError
from serve_core.prom import DEFAULT_LATENCY_BUCKETS, FOLD_AT, MetricsConfig, error_kind
from serve_core.testing import FakeClock

from .conftest import WAIT, require
from .procs import wait_until
from .scripted import ScriptedExecutor

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
ROOT = Path(__file__).resolve().parents[1]


def has_prometheus() -> bool:
    return importlib.util.find_spec("prometheus_client") is not None


@pytest.fixture(autouse=True)
def _prometheus() -> None:
    require(has_prometheus(), "prometheus-client is not installed (pip install 'serve-core[metrics]')")


def parse(text: str) -> Samples:
    """Every sample of an exposition, by name and sorted labels."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(srv: Serve) -> Samples:
    """``srv.metrics_app()`` called as a WSGI app."""
    from werkzeug.test import Client

    response = Client(srv.metrics_app()).get("/")
    assert response.status_code == 200
    return parse(response.get_data(as_text=True))


def labels(**values: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(values.items()))


def value(samples: Samples, name: str, **label_values: str) -> float:
    return samples.get((name, labels(**label_values)), 0.0)


def flaky(fail: bool = False) -> str:
    if fail:
        raise ValueError("scripted failure")
    return "ok"


def test_requests_errors_and_phases_are_counted_exactly_per_label_set(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="inline", clock=FakeClock())
    for endpoint, tag in (("a", "x"), ("b", "y")):
        srv.create_endpoint(endpoint)
        srv.create_backend(flaky, tag)
        srv.link(endpoint, tag)
    for _ in range(5):
        srv.get_handle("a").remote().result(WAIT)
    for index in range(7):
        future = srv.get_handle("b").remote(fail=index < 3)
        assert future.exception(WAIT) is not None if index < 3 else future.result(WAIT) == "ok"
    samples = scrape(srv)
    assert value(samples, "serve_core_requests_total", endpoint="a", backend="x") == 5
    assert value(samples, "serve_core_requests_total", endpoint="b", backend="y") == 7
    assert value(samples, "serve_core_errors_total", endpoint="b", backend="y", kind="user_error") == 3
    assert not [key for key in samples if key[0] == "serve_core_errors_total" and ("backend", "x") in key[1]]
    for phase in ("queue", "batch_wait", "execution", "total"):
        count = "serve_core_request_latency_seconds_count"
        assert value(samples, count, endpoint="a", backend="x", phase=phase) == 5
        assert value(samples, count, endpoint="b", backend="y", phase=phase) == 7
    assert value(samples, "serve_core_batch_size_count", backend="x") == 5  # single calls: size 1
    assert value(samples, "serve_core_batch_size_bucket", backend="x", le="1.0") == 5
    assert value(samples, "serve_core_batch_size_sum", backend="y") == 7


def test_latency_phases_land_in_their_buckets_on_the_fake_clock(make_serve: Callable[..., Serve]) -> None:
    clock = FakeClock()
    srv = make_serve(executor="inline", clock=clock)

    def three_ms() -> None:
        clock.advance(0.003)  # the call takes 3 ms of the instance's time

    srv.create_endpoint("e")
    srv.create_backend(three_ms, "t")
    srv.link("e", "t")
    for _ in range(4):
        srv.get_handle("e").remote().result(WAIT)
    samples = scrape(srv)
    bucket = "serve_core_request_latency_seconds_bucket"
    for phase in ("execution", "total"):
        assert value(samples, bucket, endpoint="e", backend="t", phase=phase, le="0.0025") == 0
        assert value(samples, bucket, endpoint="e", backend="t", phase=phase, le="0.005") == 4
        total = value(samples, "serve_core_request_latency_seconds_sum", endpoint="e", backend="t", phase=phase)
        assert total == pytest.approx(0.012)
    assert value(samples, bucket, endpoint="e", backend="t", phase="queue", le="0.0005") == 4
    assert value(samples, "serve_core_request_latency_seconds_sum", endpoint="e", backend="t", phase="queue") == 0


def test_counts_stay_exact_past_the_sample_buffer(make_serve: Callable[..., Serve]) -> None:
    clock = FakeClock()
    srv = make_serve(executor="inline", clock=clock)

    def three_ms() -> None:
        clock.advance(0.003)

    srv.create_endpoint("e")
    srv.create_backend(three_ms, "t")
    srv.link("e", "t")
    calls = 2 * (FOLD_AT // 3) + 5  # samples bucketed twice on the way, the rest at the scrape
    handle = srv.get_handle("e")
    for _ in range(calls):
        handle.remote().result(WAIT)
    samples = scrape(srv)
    bucket = "serve_core_request_latency_seconds_bucket"
    assert value(samples, "serve_core_requests_total", endpoint="e", backend="t") == calls
    assert value(samples, bucket, endpoint="e", backend="t", phase="execution", le="0.0025") == 0
    assert value(samples, bucket, endpoint="e", backend="t", phase="execution", le="0.005") == calls
    assert value(samples, bucket, endpoint="e", backend="t", phase="queue", le="0.0005") == calls
    for phase in ("execution", "total"):
        total = value(samples, "serve_core_request_latency_seconds_sum", endpoint="e", backend="t", phase=phase)
        assert total == pytest.approx(0.003 * calls)
    assert value(samples, "serve_core_batch_size_count", backend="t") == calls
    assert scrape(srv) == samples  # a scrape changes nothing


def test_a_batch_that_waits_to_fill_counts_its_wait_apart_from_the_queue(make_serve: Callable[..., Serve]) -> None:
    clock = FakeClock()
    srv = make_serve(executor="inline", clock=clock)

    @accept_batch
    def echo(*, x: list[int]) -> list[int]:
        return x

    srv.create_endpoint("e")
    srv.create_backend(echo, "bt", backend_config=BackendConfig(max_batch_size=4, batch_wait_timeout_s=0.02))
    srv.link("e", "bt")
    handle = srv.get_handle("e")
    first = handle.remote(x=1)
    clock.advance(0.005)
    second = handle.remote(x=2)
    clock.advance(0.015)  # the batch leaves when its oldest query has waited 20 ms
    assert (first.result(WAIT), second.result(WAIT)) == (1, 2)
    samples = scrape(srv)
    total_of = "serve_core_request_latency_seconds_sum"
    assert value(samples, total_of, endpoint="e", backend="bt", phase="batch_wait") == pytest.approx(0.035)
    assert value(samples, total_of, endpoint="e", backend="bt", phase="queue") == pytest.approx(0.0)
    assert value(samples, total_of, endpoint="e", backend="bt", phase="total") == pytest.approx(0.035)
    assert value(samples, "serve_core_batch_size_count", backend="bt") == 1
    assert value(samples, "serve_core_batch_size_sum", backend="bt") == 2
    assert value(samples, "serve_core_batch_size_bucket", backend="bt", le="1.0") == 0
    assert value(samples, "serve_core_batch_size_bucket", backend="bt", le="2.0") == 1


def answer() -> str:
    return "done"


def test_errors_are_counted_by_kind(make_serve: Callable[..., Serve]) -> None:
    clock, executor = FakeClock(), ScriptedExecutor()
    srv = make_serve(executor=executor, clock=clock, drain_timeout_s=0.05, pending_timeout_s=2.0)
    srv.create_endpoint("e")
    config = BackendConfig(max_queue_size=1, drop_expired=True)
    srv.create_backend(answer, "s", backend_config=config)
    srv.link("e", "s")
    handle = srv.get_handle("e")
    held = handle.remote()  # on the replica, held
    expiring = handle.options(relative_slo_ms=10).remote()  # queued behind it
    with pytest.raises(BackPressureError):
        handle.remote()  # the queue of one is full
    clock.advance(0.02)
    assert "deadline" in str(expiring.exception(WAIT))
    (replica,) = executor.live()
    replica.crash()
    assert held.exception(WAIT) is not None
    waiting = srv.get_handle("nowhere", missing_ok=True).remote()
    clock.advance(2.0)  # the waiting room's timeout
    assert waiting.exception(WAIT) is not None
    assert wait_until(lambda: len(executor.live()) == 1, WAIT)  # replaced
    samples = scrape(srv)
    errors = "serve_core_errors_total"
    assert value(samples, errors, endpoint="e", backend="s", kind="backpressure") == 1
    assert value(samples, errors, endpoint="e", backend="s", kind="deadline") == 1
    assert value(samples, errors, endpoint="e", backend="s", kind="replica_died") == 1
    assert value(samples, errors, endpoint="nowhere", backend="", kind="deadline") == 1
    assert value(samples, "serve_core_requests_total", endpoint="e", backend="s") == 3
    assert value(samples, "serve_core_requests_total", endpoint="nowhere", backend="") == 1


def test_queries_cut_by_shutdown_count_as_shutdown(make_serve: Callable[..., Serve]) -> None:
    executor = ScriptedExecutor()
    srv = make_serve(executor=executor, clock=FakeClock(), drain_timeout_s=0.05)
    srv.create_endpoint("e")
    srv.create_backend(answer, "s")
    srv.link("e", "s")
    app = srv.metrics_app()
    futures = [srv.get_handle("e").remote() for _ in range(3)]  # one held, two queued
    srv.shutdown()
    assert all(future.exception(WAIT) is not None for future in futures)
    from werkzeug.test import Client

    samples = parse(Client(app).get("/").get_data(as_text=True))
    assert value(samples, "serve_core_errors_total", endpoint="e", backend="s", kind="shutdown") == 3
    assert value(samples, "serve_core_requests_total", endpoint="e", backend="s") == 3


def test_gauges_show_queue_in_flight_and_replicas(make_serve: Callable[..., Serve]) -> None:
    executor = ScriptedExecutor()
    srv = make_serve(executor=executor, clock=FakeClock())
    srv.create_endpoint("e")
    srv.create_backend(answer, "s", backend_config=BackendConfig(num_replicas=2))
    srv.link("e", "s")
    futures = [srv.get_handle("e").remote() for _ in range(3)]
    samples = scrape(srv)
    assert value(samples, "serve_core_in_flight", backend="s") == 2
    assert value(samples, "serve_core_queue_length", backend="s") == 1
    assert value(samples, "serve_core_replicas", backend="s", state="desired") == 2
    assert value(samples, "serve_core_replicas", backend="s", state="running") == 2
    while not all(future.done() for future in futures):
        for replica in executor.held():
            replica.complete()
    samples = scrape(srv)
    assert value(samples, "serve_core_in_flight", backend="s") == 0
    assert value(samples, "serve_core_queue_length", backend="s") == 0


def test_a_replaced_backend_keeps_counting_under_its_tag(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="inline", clock=FakeClock())
    srv.create_endpoint("e")
    srv.create_backend(answer, "s")
    srv.link("e", "s")
    srv.get_handle("e").remote().result(WAIT)
    srv.create_backend(flaky, "s", replace=True)  # a new runtime under the same tag
    srv.get_handle("e").remote().result(WAIT)
    samples = scrape(srv)
    assert value(samples, "serve_core_requests_total", endpoint="e", backend="s") == 2
    running = "serve_core_replicas"  # the old runtime's replica counts until its drain ends
    assert wait_until(lambda: value(scrape(srv), running, backend="s", state="running") == 1, WAIT)


def test_custom_buckets_are_the_exported_ones(make_serve: Callable[..., Serve]) -> None:
    config = MetricsConfig(latency_buckets=(0.01, 1, float("inf")), batch_size_buckets=(1, 10))
    assert config.latency_buckets == (0.01, 1.0)
    srv = make_serve(executor="inline", metrics=config)
    srv.create_endpoint("e")
    srv.create_backend(answer, "s")
    srv.link("e", "s")
    srv.get_handle("e").remote().result(WAIT)
    samples = scrape(srv)
    les = {dict(key[1])["le"] for key in samples if key[0] == "serve_core_request_latency_seconds_bucket"}
    assert les == {"0.01", "1.0", "+Inf"}
    sizes = {dict(key[1])["le"] for key in samples if key[0] == "serve_core_batch_size_bucket"}
    assert sizes == {"1.0", "10.0", "+Inf"}


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"latency_buckets": ()}, ValidationError),
        ({"latency_buckets": (1, 0.5)}, ValidationError),
        ({"latency_buckets": (0, 1)}, ValidationError),
        ({"latency_buckets": "1,2"}, ServeTypeError),
        ({"batch_size_buckets": (1, float("nan"))}, ValidationError),
        ({"enabled": "yes"}, ServeTypeError),
        ({"request_ids": 1}, ServeTypeError),
        ({"multiprocess_refresh_s": 0}, ValidationError),
    ],
)
def test_bad_metrics_configs_are_refused(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        MetricsConfig(**kwargs)


def test_metrics_option_takes_a_bool_or_a_config(make_serve: Callable[..., Serve]) -> None:
    assert MetricsConfig.of(True) == MetricsConfig()
    assert MetricsConfig.of(False) == MetricsConfig(enabled=False)
    assert MetricsConfig().latency_buckets == DEFAULT_LATENCY_BUCKETS
    with pytest.raises(ServeTypeError):
        make_serve(metrics="on")


def test_disabled_metrics_record_nothing_and_export_nothing(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="inline", metrics=False)
    srv.create_endpoint("e")
    srv.create_backend(answer, "s")
    srv.link("e", "s")
    srv.get_handle("e").remote().result(WAIT)
    assert srv.metrics.meters() == []
    with pytest.raises(NotFoundError):
        srv.metrics_app()


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        ("RequestTimeoutError", "timeout"),
        ("DeadlineExceededError", "deadline"),
        ("BackPressureError", "backpressure"),
        ("ReplicaDiedError", "replica_died"),
        ("NotDeliveredError", "replica_died"),
        ("ShuttingDownError", "shutdown"),
        ("ValueError", "user_error"),
    ],
)
def test_error_kinds(error: str, kind: str) -> None:
    import builtins

    import serve_core.errors as errors

    cls = getattr(errors, error, None) or getattr(builtins, error)
    assert error_kind(cls("x")) == kind


def test_the_core_does_not_import_prometheus_client_until_scraped() -> None:
    code = (
        "import sys, serve_core\n"
        "srv = serve_core.Serve(start_server=False, executor='inline')\n"
        "srv.create_endpoint('e'); srv.create_backend(lambda: 1, 'b'); srv.link('e', 'b')\n"
        "assert srv.get_handle('e').remote().result(10) == 1\n"
        "srv.wsgi_app()\n"
        "assert 'prometheus_client' not in sys.modules, 'imported before a scrape'\n"
        "srv.metrics_app()\n"
        "assert 'prometheus_client' in sys.modules\n"
        "srv.shutdown()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=6 * WAIT)
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------- multiprocess
@pytest.fixture
def multiprocess_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """prometheus-client in multiprocess mode, as if the variable had been set before it was imported."""
    from prometheus_client import values

    directory = tmp_path / "prom"
    directory.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())
    return directory


def test_multiprocess_mode_sums_the_files_of_every_worker(
    make_serve: Callable[..., Serve], multiprocess_dir: Path
) -> None:
    from prometheus_client import Counter, Gauge, values

    srv = make_serve(executor="inline", metrics=MetricsConfig(multiprocess_refresh_s=3600))
    assert srv.metrics.multiprocess
    srv.create_endpoint("e")
    srv.create_backend(flaky, "s")
    srv.link("e", "s")
    for index in range(6):
        srv.get_handle("e").remote(fail=index == 0).exception(WAIT)
    # Another worker (another pid) wrote its own files into the same directory.
    other = values.MultiProcessValue(process_identifier=lambda: 999_999)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(values, "ValueClass", other)
        Counter("serve_core_requests", "x", ("endpoint", "backend"), registry=None).labels("e", "s").inc(4)
        Gauge(
            "serve_core_replicas", "x", ("backend", "state"), registry=None, multiprocess_mode="livesum"
        ).labels("s", "running").set(1)
    samples = scrape(srv)
    assert value(samples, "serve_core_requests_total", endpoint="e", backend="s") == 10
    assert value(samples, "serve_core_errors_total", endpoint="e", backend="s", kind="user_error") == 1
    assert value(samples, "serve_core_request_latency_seconds_count", endpoint="e", backend="s", phase="total") == 6
    assert value(samples, "serve_core_batch_size_count", backend="s") == 6
    assert value(samples, "serve_core_replicas", backend="s", state="running") == 2  # livesum: both workers
    assert value(samples, "serve_core_replicas", backend="s", state="desired") == 1  # the other set none
    srv.shutdown()  # this worker's gauges drop to zero
    assert value(parse_files(multiprocess_dir), "serve_core_replicas", backend="s", state="running") == 1


def parse_files(directory: Path) -> Samples:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return parse(generate_latest(registry).decode())


def test_multiprocess_mode_refuses_a_prometheus_client_imported_too_early(
    make_serve: Callable[..., Serve], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prometheus_client import values

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MutexValue)
    with pytest.raises(ServeStateError, match="imported before"):
        make_serve(executor="inline")


def test_multiprocess_gauges_refresh_on_the_clock(make_serve: Callable[..., Serve], multiprocess_dir: Path) -> None:
    clock = FakeClock()
    srv = make_serve(executor="inline", clock=clock, metrics=MetricsConfig(multiprocess_refresh_s=1.0))
    srv.create_endpoint("e")
    srv.create_backend(answer, "s", backend_config=BackendConfig(num_replicas=2))
    srv.link("e", "s")
    assert value(parse_files(multiprocess_dir), "serve_core_replicas", backend="s", state="running") == 0
    clock.advance(1.0)
    assert value(parse_files(multiprocess_dir), "serve_core_replicas", backend="s", state="running") == 2


def test_recording_is_safe_under_concurrent_calls(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="thread")
    srv.create_endpoint("e")
    srv.create_backend(answer, "s", backend_config=BackendConfig(num_replicas=2))
    srv.link("e", "s")
    handle = srv.get_handle("e")
    calls, threads = 200, 4

    def caller() -> None:
        for _ in range(calls):
            handle.remote().result(WAIT)

    workers = [threading.Thread(target=caller) for _ in range(threads)]
    for worker in workers:
        worker.start()
    scrapes = [scrape(srv) for _ in range(5)]  # scraping while they record
    for worker in workers:
        worker.join(6 * WAIT)
    assert all(value(s, "serve_core_requests_total", endpoint="e", backend="s") <= calls * threads for s in scrapes)
    assert value(scrape(srv), "serve_core_requests_total", endpoint="e", backend="s") == calls * threads


def test_streams_count_their_items_and_duration(make_serve: Callable[..., Serve]) -> None:
    def numbers(n: int = 1) -> Any:
        yield from range(n)

    srv = make_serve(executor="thread")
    srv.create_endpoint("s")
    srv.create_backend(numbers, "s:v1")
    srv.link("s", "s:v1")
    for n in (3, 4):
        assert list(srv.get_handle("s").options(stream=True).remote(n=n)) == list(range(n))
    assert wait_until(lambda: value(scrape(srv), "serve_core_streams_total", endpoint="s", backend="s:v1") == 2, WAIT)
    samples = scrape(srv)
    assert value(samples, "serve_core_stream_items_total", endpoint="s", backend="s:v1") == 7
    assert value(samples, "serve_core_stream_seconds_total", endpoint="s", backend="s:v1") > 0
    assert value(samples, "serve_core_requests_total", endpoint="s", backend="s:v1") == 2

"""The HTTP front's observability: ``/-/metrics``, the access log, request ids and ``Server-Timing``.

The multiprocess test runs a real ``gunicorn -w 2`` on the app factory with
``PROMETHEUS_MULTIPROC_DIR`` and checks that a scrape on either worker adds up both.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import Client
from werkzeug.wrappers import Response

import serve_core as serve
from serve_core import BackendConfig, Serve, accept_batch
from serve_core.cli import _parser
from serve_core.http.accesslog import ACCESS_LOGGER, FIELDS, configure_access_log, server_timing, valid_request_id
from serve_core.prom import MetricsConfig
from serve_core.queues import Timing

from ..conftest import WAIT, require
from ..net import free_port
from ..procs import wait_until

ROOT = Path(__file__).resolve().parents[2]
GENERATED_ID = re.compile(r"[0-9a-f]{32}")
TIMING = re.compile(
    r'queue;dur=(?P<queue>[\d.]+), batch_wait;dur=(?P<batch_wait>[\d.]+), '
    r'execution;dur=(?P<execution>[\d.]+), backend;desc="(?P<backend>[^"]*)"'
)


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def needs_prometheus() -> None:
    require(has("prometheus_client"), "prometheus-client is not installed (pip install 'serve-core[metrics]')")


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def echo_id(request: Any) -> dict[str, Any]:
    header = request.headers.get("X-Request-ID") if serve.context.web else None
    return {"context": serve.context.request_id, "header": header}


def fails(request: Any) -> None:
    raise ValueError("backend failure")


def deployed(make_app: Callable[..., tuple[Serve, Any]], **kwargs: Any) -> tuple[Serve, Any]:
    srv, client = make_app(**kwargs)
    srv.create_endpoint("ids", "/ids")
    srv.create_backend(echo_id, "ids:v1")
    srv.link("ids", "ids:v1")
    srv.create_endpoint("fails", "/fails")
    srv.create_backend(fails, "fails:v1")
    srv.link("fails", "fails:v1")
    return srv, client


# ------------------------------------------------------------------ /-/metrics
def test_metrics_route_counts_http_requests_exactly(make_app: Callable[..., tuple[Serve, Any]]) -> None:
    needs_prometheus()
    srv, client = deployed(make_app)
    for _ in range(7):
        assert client.request("GET", "/ids").status == 200
    for _ in range(2):
        assert client.request("GET", "/fails").status == 500
    assert client.request("GET", "/nowhere").status == 404  # never reaches the core: not counted
    srv.get_handle("ids").remote().result(WAIT)  # handles count too
    reply = client.request("GET", "/-/metrics")
    assert reply.status == 200 and reply.content_type.startswith("text/plain; version=")
    samples = parse(reply.text)
    assert sample(samples, "serve_core_requests_total", endpoint="ids", backend="ids:v1") == 8
    assert sample(samples, "serve_core_requests_total", endpoint="fails", backend="fails:v1") == 2
    assert sample(samples, "serve_core_errors_total", endpoint="fails", backend="fails:v1", kind="user_error") == 2
    total = "serve_core_request_latency_seconds_count"
    assert sample(samples, total, endpoint="ids", backend="ids:v1", phase="total") == 8
    assert sample(samples, "serve_core_replicas", backend="ids:v1", state="running") == 1
    assert client.request("HEAD", "/-/metrics").body == b""


def test_metrics_in_openmetrics_when_the_scraper_asks(make_serve: Callable[..., Serve]) -> None:
    needs_prometheus()
    srv = make_serve()
    reply = Client(srv.wsgi_app()).get("/-/metrics", headers={"Accept": "application/openmetrics-text"})
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("application/openmetrics-text")
    assert reply.get_data(as_text=True).rstrip().endswith("# EOF")


def test_metrics_in_the_mounted_app_and_from_metrics_app(make_serve: Callable[..., Serve]) -> None:
    needs_prometheus()
    srv = make_serve()
    srv.create_endpoint("ids", "/ids")
    srv.create_backend(echo_id, "ids:v1")
    srv.link("ids", "ids:v1")
    host = DispatcherMiddleware(Response("host"), {"/serve": srv.wsgi_app(), "/metrics": srv.metrics_app()})
    client = Client(host)
    for _ in range(3):
        assert client.get("/serve/ids").status_code == 200
    for path in ("/serve/-/metrics", "/metrics"):
        samples = parse(client.get(path).get_data(as_text=True))
        assert sample(samples, "serve_core_requests_total", endpoint="ids", backend="ids:v1") == 3


def test_metrics_route_is_404_when_metrics_are_off(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(metrics=False)
    reply = Client(srv.wsgi_app()).get("/-/metrics")
    assert reply.status_code == 404 and "disabled" in reply.get_data(as_text=True)


def test_an_http_timeout_counts_as_a_timeout_error(make_serve: Callable[..., Serve]) -> None:
    needs_prometheus()
    gate = threading.Event()
    srv = make_serve(http_request_timeout_s=0.2)
    srv.create_endpoint("slow", "/slow")
    srv.create_backend(lambda request: gate.wait(WAIT), "slow:v1")
    srv.link("slow", "slow:v1")
    client = Client(srv.wsgi_app())
    try:
        assert client.get("/slow").status_code == 504
    finally:
        gate.set()
    samples = parse(client.get("/-/metrics").get_data(as_text=True))
    assert sample(samples, "serve_core_errors_total", endpoint="slow", backend="", kind="timeout") == 1
    # The call itself is counted by its backend when it ends (it was running: it finishes unheard).
    assert wait_until(
        lambda: sample(
            parse(client.get("/-/metrics").get_data(as_text=True)),
            "serve_core_requests_total", endpoint="slow", backend="slow:v1",
        ) == 1,
        WAIT,
    )


# ----------------------------------------------------------------- request ids
def test_a_client_request_id_is_kept_passed_to_the_backend_and_returned(
    make_app: Callable[..., tuple[Serve, Any]],
) -> None:
    srv, client = deployed(make_app)
    for request_id in ("abc-123", "trace:0a1b.2C_3", "x" * 128):
        reply = client.request("GET", "/ids", headers={"X-Request-ID": request_id})
        assert reply.status == 200 and reply.headers["x-request-id"] == request_id
        assert json.loads(reply.body) == {"context": request_id, "header": request_id}


def test_a_missing_request_id_is_generated(make_app: Callable[..., tuple[Serve, Any]]) -> None:
    srv, client = deployed(make_app)
    seen = set()
    for _ in range(3):
        reply = client.request("GET", "/ids")
        request_id = reply.headers["x-request-id"]
        assert GENERATED_ID.fullmatch(request_id), request_id
        assert json.loads(reply.body) == {"context": request_id, "header": request_id}
        seen.add(request_id)
    assert len(seen) == 3
    assert GENERATED_ID.fullmatch(client.request("GET", "/nowhere").headers["x-request-id"])  # errors get one too


@pytest.mark.parametrize("bad", ["x" * 129, "has space", "semi;colon", "quote\"d", "é"])
def test_an_invalid_request_id_is_refused_with_400(make_serve: Callable[..., Serve], bad: str) -> None:
    srv = make_serve()
    srv.create_endpoint("ids", "/ids")
    srv.create_backend(echo_id, "ids:v1")
    srv.link("ids", "ids:v1")
    environ_overrides = {"HTTP_X_REQUEST_ID": bad}  # raw, as a server would pass it
    reply = Client(srv.wsgi_app()).get("/ids", environ_overrides=environ_overrides)
    assert reply.status_code == 400 and "X-Request-ID" in reply.get_data(as_text=True)
    assert GENERATED_ID.fullmatch(reply.headers["X-Request-ID"])  # the refusal can be traced too
    assert not valid_request_id(bad)


def test_request_ids_and_server_timing_can_be_turned_off(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(metrics=MetricsConfig(request_ids=False, server_timing=False))
    srv.create_endpoint("ids", "/ids")
    srv.create_backend(echo_id, "ids:v1")
    srv.link("ids", "ids:v1")
    reply = Client(srv.wsgi_app()).get("/ids", headers={"X-Request-ID": "kept-as-is"})
    assert "X-Request-ID" not in reply.headers and "Server-Timing" not in reply.headers
    assert reply.get_json() == {"context": None, "header": "kept-as-is"}  # untouched, unvalidated


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_the_backend_sees_the_request_id_on_every_local_executor(
    make_serve: Callable[..., Serve], executor: str
) -> None:
    srv = make_serve(executor=executor)
    srv.create_endpoint("ids", "/ids")
    srv.create_backend(echo_id, "ids:v1")
    srv.link("ids", "ids:v1")
    client = Client(srv.wsgi_app())
    assert client.get("/ids", headers={"X-Request-ID": "req-7"}).get_json() == {"context": "req-7", "header": "req-7"}
    reply = client.get("/ids")
    generated = reply.headers["X-Request-ID"]
    assert reply.get_json() == {"context": generated, "header": generated}
    assert srv.get_handle("ids").remote().result(WAIT) == {"context": None, "header": None}  # a Python call


def python_call_context() -> Any:
    return serve.context.request_id


@accept_batch
def batch_ids(requests: list[Any]) -> list[Any]:
    return [{"context": serve.context.request_id, "header": r.headers.get("X-Request-ID")} for r in requests]


def test_request_id_in_python_calls_and_batches(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve()
    srv.create_endpoint("py")
    srv.create_backend(python_call_context, "py:v1")
    srv.link("py", "py:v1")
    assert srv.get_handle("py").remote().result(WAIT) is None
    srv.create_endpoint("batch", "/batch")
    srv.create_backend(batch_ids, "batch:v1", backend_config=BackendConfig(max_batch_size=4))
    srv.link("batch", "batch:v1")
    assert Client(srv.wsgi_app()).get("/batch", headers={"X-Request-ID": "b-1"}).get_json() == {
        "context": None, "header": "b-1",
    }


def test_a_backend_response_keeps_one_request_id_header(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve()
    srv.create_endpoint("own", "/own")
    srv.create_backend(lambda request: Response("own", headers={"X-Request-ID": "theirs"}), "own:v1")
    srv.link("own", "own:v1")
    reply = Client(srv.wsgi_app()).get("/own", headers={"X-Request-ID": "ours"})
    assert reply.headers.getlist("X-Request-ID") == ["ours"]
    assert TIMING.fullmatch(reply.headers["Server-Timing"])


# ---------------------------------------------------------------- Server-Timing
def test_server_timing_names_the_phases_and_the_backend(make_app: Callable[..., tuple[Serve, Any]]) -> None:
    srv, client = deployed(make_app)
    reply = client.request("GET", "/ids")
    match = TIMING.fullmatch(reply.headers["server-timing"])
    assert match is not None, reply.headers["server-timing"]
    assert match["backend"] == "ids:v1"
    assert all(float(match[phase]) >= 0 for phase in ("queue", "batch_wait", "execution"))
    failed = client.request("GET", "/fails")
    assert failed.status == 500 and TIMING.fullmatch(failed.headers["server-timing"])  # it ran: timed
    assert "server-timing" not in client.request("GET", "/nowhere").headers  # nothing ran


def test_server_timing_shows_the_batch_wait(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve()
    srv.create_endpoint("batch", "/batch")
    config = BackendConfig(max_batch_size=8, batch_wait_timeout_s=0.05)
    srv.create_backend(batch_ids, "batch:v1", backend_config=config)
    srv.link("batch", "batch:v1")
    reply = Client(srv.wsgi_app()).get("/batch")  # alone: it waits the whole 50 ms for company
    match = TIMING.fullmatch(reply.headers["Server-Timing"])
    assert match is not None
    # The wait starts when the replica first holds the batch open, a moment after the arrival.
    waited, queued = float(match["batch_wait"]), float(match["queue"])
    assert waited + queued >= 49.9 and waited > queued


def test_server_timing_quotes_any_tag() -> None:
    timing = Timing('we"ird\\tag é', "r#1", 0.0008, 0.0, 0.0021)
    assert server_timing(timing) == (
        'queue;dur=0.800, batch_wait;dur=0.000, execution;dur=2.100, backend;desc="we\\"ird\\\\tag %C3%A9"'
    )


# ------------------------------------------------------------------- access log
def test_one_access_record_per_request_with_every_field(
    make_app: Callable[..., tuple[Serve, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    srv, client = deployed(make_app)
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    client.request("GET", "/ids", headers={"X-Request-ID": "log-1"})
    client.request("GET", "/fails")
    client.request("POST", "/nowhere")
    records = [record for record in caplog.records if record.name == ACCESS_LOGGER]
    assert len(records) == 3
    for record in records:
        assert all(hasattr(record, name) for name in FIELDS)
        assert isinstance(record.duration_ms, float) and record.duration_ms >= 0  # type: ignore[attr-defined]
    ok, failed, missing = (vars(record) for record in records)
    assert {k: ok[k] for k in ("method", "path", "status", "endpoint", "backend", "replica", "request_id")} == {
        "method": "GET", "path": "/ids", "status": 200, "endpoint": "ids", "backend": "ids:v1",
        "replica": "ids:v1#1", "request_id": "log-1",
    }
    assert (failed["status"], failed["backend"]) == (500, "fails:v1")
    assert (missing["status"], missing["endpoint"], missing["backend"], missing["replica"]) == (404, "-", "-", "-")
    assert GENERATED_ID.fullmatch(missing["request_id"])
    assert records[0].getMessage().endswith('"GET /ids" 200 ' + f"{ok['duration_ms']:.2f}ms endpoint=ids "
                                           "backend=ids:v1 replica=ids:v1#1 request_id=log-1")


@pytest.fixture
def access_logger() -> Iterator[logging.Logger]:
    """The access logger, restored after the test."""
    logger = logging.getLogger(ACCESS_LOGGER)
    state = (list(logger.handlers), logger.level, logger.propagate)
    yield logger
    for handler in logger.handlers:
        if handler not in state[0]:
            handler.close()  # stops its writer thread
    logger.handlers[:], logger.level, logger.propagate = state[0], state[1], state[2]


def test_json_access_log_is_one_object_per_line(
    make_serve: Callable[..., Serve], access_logger: logging.Logger
) -> None:
    stream = io.StringIO()
    configure_access_log("json", stream)
    handler = configure_access_log("json", stream)  # idempotent: still one handler
    assert access_logger.handlers == [handler]
    srv = make_serve()
    srv.create_endpoint("ids", "/ids")
    srv.create_backend(echo_id, "ids:v1")
    srv.link("ids", "ids:v1")
    client = Client(srv.wsgi_app())
    client.get("/ids", headers={"X-Request-ID": "json-1"})
    client.get("/-/routes")
    handler.flush()  # what the writer thread would do within WRITE_INTERVAL_S
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert set(FIELDS) | {"time", "level", "logger"} == set(first)
    assert (first["request_id"], first["status"], first["backend"], first["logger"]) == ("json-1", 200, "ids:v1",
                                                                                        ACCESS_LOGGER)
    assert second["path"] == "/-/routes" and second["endpoint"] == "-"


def test_text_access_log_and_bad_formats(access_logger: logging.Logger) -> None:
    stream = io.StringIO()
    configure_access_log("text", stream)
    access_logger.info("hello")
    assert wait_until(lambda: stream.getvalue().rstrip().endswith(" hello"), WAIT)  # written by the thread
    with pytest.raises(ValueError, match="text, json"):
        configure_access_log("xml")


def test_cli_takes_log_format() -> None:
    assert _parser().parse_args(["run", "app.py"]).log_format == "text"
    assert _parser().parse_args(["run", "app.py", "--log-format", "json"]).log_format == "json"
    with pytest.raises(SystemExit):
        _parser().parse_args(["run", "app.py", "--log-format", "xml"])


# -------------------------------------------------------- gunicorn, multiprocess
PID_APP = """
import os, time
import serve_core as serve

def pid(request):
    time.sleep(0.02)  # a little work, so that concurrent requests spread over the workers
    return str(os.getpid())

serve.create_endpoint("pid", "/pid")
serve.create_backend(pid, "pid:v1")
serve.link("pid", "pid:v1")
"""


GUNICORN_CONF = """
import os
import shutil

from prometheus_client import multiprocess


def on_starting(server):
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)


def child_exit(server, worker):
    multiprocess.mark_process_dead(worker.pid)
"""  # the one of docs/metrics.md


def test_gunicorn_workers_add_up_in_multiprocess_mode(tmp_path: Path) -> None:
    needs_prometheus()
    require(has("gunicorn"), "gunicorn is not installed (pip install gunicorn)")
    app, store, prom = tmp_path / "app.py", str(tmp_path / "s.db"), tmp_path / "prom"
    app.write_text(textwrap.dedent(PID_APP))
    (tmp_path / "gunicorn.conf.py").write_text(GUNICORN_CONF)
    prom.mkdir()
    (prom / "counter_4242.db").write_bytes(b"left by a previous run")  # on_starting clears it
    port = free_port()
    env = dict(
        os.environ, PYTHONPATH=str(ROOT), SERVE_CORE_APP=str(app), SERVE_CORE_KV_STORE=store,
        PROMETHEUS_MULTIPROC_DIR=str(prom), SERVE_CORE_LOG_FORMAT="json",
    )
    command = ["-m", "gunicorn", "-c", "gunicorn.conf.py", "-w", "2", "-b", f"127.0.0.1:{port}",
               "--graceful-timeout", "5", "serve_core.http.granian:app_from_env()"]
    log = tmp_path / "server.log"  # a file, not a pipe nobody reads: a full pipe would block the server
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, *command], cwd=tmp_path, env=env, stdout=sink, stderr=sink)
    url = f"http://127.0.0.1:{port}"
    answered: list[str] = []

    def call(_: int) -> None:
        try:
            reply = requests.get(f"{url}/pid", timeout=WAIT)
        except requests.ConnectionError:
            return  # not listening yet
        if reply.status_code == 200:
            answered.append(reply.text)  # list.append is atomic

    try:
        with ThreadPoolExecutor(4) as pool:
            both = wait_until(lambda: list(pool.map(call, range(8))) and len(set(answered)) == 2, 6 * WAIT)
        assert both, log.read_text()
        assert not (prom / "counter_4242.db").exists()
        samples = parse(requests.get(f"{url}/-/metrics", timeout=WAIT).text)  # one worker answers for both
        assert sample(samples, "serve_core_requests_total", endpoint="pid", backend="pid:v1") == len(answered)
        latency = "serve_core_request_latency_seconds_count"
        assert sample(samples, latency, endpoint="pid", backend="pid:v1", phase="execution") == len(answered)
        assert wait_until(  # gauges: each worker sets its own every second; livesum adds them
            lambda: sample(
                parse(requests.get(f"{url}/-/metrics", timeout=WAIT).text),
                "serve_core_replicas", backend="pid:v1", state="running",
            ) == 2,
            WAIT,
        ), log.read_text()
    finally:
        proc.terminate()
        proc.wait(3 * WAIT)
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert {record["path"] for record in records} >= {"/pid", "/-/metrics"}
    assert all(GENERATED_ID.fullmatch(record["request_id"]) for record in records)

"""The WSGI front's behaviour, through the test client and through a real socket."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from werkzeug.wrappers import Request, Response

import serve_core as serve
from serve_core import BackendConfig, BackPressureError, Serve
from serve_core.runtime import retry_after_hint
from serve_core.testing import FakeClock

from ..conftest import WAIT
from ..scripted import ScriptedExecutor
from .helpers import InProcess

MakeApp = Callable[..., tuple[Serve, Any]]


def _deploy(
    srv: Serve, func: Any, route: str = "/f", methods: tuple[str, ...] = ("GET",), **cfg: Any
) -> None:
    name = route.strip("/").replace("/", "_") or "root"
    srv.create_endpoint(name, route, methods=methods)
    srv.create_backend(func, f"{name}:v1", backend_config=BackendConfig(**cfg) if cfg else None)
    srv.link(name, f"{name}:v1")


def test_builtin_routes(make_app: MakeApp) -> None:
    srv, client = make_app()
    srv.create_endpoint("api", "/api", methods=["GET", "post"])
    srv.create_endpoint("headless")
    reply = client.request("GET", "/-/routes")
    assert reply.status == 200 and reply.content_type == "application/json"
    assert reply.body == b'{"/api": ["api", ["GET", "POST"]]}'
    health = client.request("GET", "/-/healthz")
    assert (health.status, health.text) == (200, "ok\n")
    _deploy(srv, lambda request: "x")
    client.request("GET", "/f")
    stat = client.request("GET", "/-/stat")
    assert stat.status == 200 and b'"f:v1_request_counter": 1' in stat.body
    assert client.request("POST", "/-/routes").status == 405
    assert client.request("GET", "/-/nope").status == 404


def test_route_added_later_is_served(make_app: MakeApp) -> None:
    srv, client = make_app()
    assert client.request("GET", "/f").status == 404
    _deploy(srv, lambda request: "late")
    assert client.request("GET", "/f").text == "late"


def test_unknown_path_is_404_and_exact(make_app: MakeApp) -> None:
    srv, client = make_app()
    _deploy(srv, lambda request: "x", route="/api")
    for path in ("/nope", "/api/", "/api/x", "/ap"):
        reply = client.request("GET", path)
        assert reply.status == 404, path
        assert reply.content_type == "text/plain; charset=utf-8"
        assert "/-/routes" in reply.text
        assert reply.headers["content-length"] == str(len(reply.body))


def test_wrong_method_is_405_with_allow(make_app: MakeApp) -> None:
    srv, client = make_app()
    _deploy(srv, lambda request: request.method, methods=("GET", "POST"))
    reply = client.request("DELETE", "/f")
    assert reply.status == 405
    assert reply.headers["allow"] == "GET, HEAD, OPTIONS, POST"
    assert client.request("POST", "/f").text == "POST"


def test_head_and_options(make_app: MakeApp) -> None:
    srv, client = make_app()
    _deploy(srv, lambda request: "body" if request.method in ("GET", "HEAD") else "?")
    get, head = client.request("GET", "/f"), client.request("HEAD", "/f")
    assert head.status == 200 and head.body == b"" and get.body == b"body"
    assert head.headers["content-length"] == "4" == get.headers["content-length"]
    options = client.request("OPTIONS", "/f")
    assert options.status == 200 and options.headers["allow"] == "GET, HEAD, OPTIONS"
    _deploy(srv, lambda request: "from backend", route="/o", methods=("OPTIONS",))
    assert client.request("OPTIONS", "/o").text == "from backend"


def test_backend_gets_a_werkzeug_request(make_app: MakeApp) -> None:
    srv, client = make_app()

    def inspect_request(request: Request) -> dict[str, Any]:
        return {
            "is_request": isinstance(request, Request),
            "web": serve.context.web,
            "args": request.args.to_dict(flat=False),
            "json": request.get_json(),
            "data": request.get_data(as_text=True),
            "header": request.headers.get("X-Test"),
            "method": request.method,
            "path": request.path,
        }

    _deploy(srv, inspect_request, methods=("POST",))
    reply = client.request(
        "POST", "/f?a=1&a=2&relative_slo_ms=500", json={"k": [1, 2]}, headers={"X-Test": "yes"}
    )
    assert reply.status == 200
    import json

    got = json.loads(reply.body)
    assert got == {
        "is_request": True,
        "web": True,
        "args": {"a": ["1", "2"], "relative_slo_ms": ["500"]},
        "json": {"k": [1, 2]},
        "data": '{"k": [1, 2]}',
        "header": "yes",
        "method": "POST",
        "path": "/f",
    }


@pytest.mark.parametrize(
    "query",
    [
        "relative_slo_ms=abc",
        "relative_slo_ms=-1",
        "absolute_slo_ms=",
        "relative_slo_ms=1&relative_slo_ms=2",
        "relative_slo_ms=1&absolute_slo_ms=2",
        "relative_slo_ms=inf",
    ],
)
def test_invalid_slo_is_400_naming_the_problem(make_app: MakeApp, query: str) -> None:
    srv, client = make_app()
    calls: list[int] = []
    _deploy(srv, lambda request: calls.append(1))
    reply = client.request("GET", f"/f?{query}")
    assert reply.status == 400
    assert "slo_ms" in reply.text
    assert calls == []


def test_valid_slos_are_accepted(make_app: MakeApp) -> None:
    srv, client = make_app()
    _deploy(srv, lambda request: "ok")
    for query in ("relative_slo_ms=1000", "absolute_slo_ms=99999999999999", "relative_slo_ms=0.5&x=1"):
        assert client.request("GET", f"/f?{query}").text == "ok"


def test_response_encoding(make_app: MakeApp) -> None:
    srv, client = make_app()
    cases: list[tuple[str, Any, str, bytes]] = [
        ("/none", None, "text/plain", b""),
        ("/bytes", b"\x00\xffraw", "text/plain", b"\x00\xffraw"),
        ("/str", "h\u00e9llo", "text/plain; charset=utf-8", "h\u00e9llo".encode()),
        ("/dict", {"a": [1, 2.5, None]}, "application/json", b'{"a": [1, 2.5, null]}'),
        ("/list", [1, "x"], "application/json", b'[1, "x"]'),
        ("/int", 7, "application/json", b"7"),
        ("/array", np.arange(3), "application/json", b"[0, 1, 2]"),
        ("/scalar", {"v": np.float32(1.5), "n": np.int64(3)}, "application/json", b'{"v": 1.5, "n": 3}'),
    ]
    for route, value, _, _ in cases:
        _deploy(srv, lambda request, value=value: value, route=route)
    for route, _, content_type, body in cases:
        reply = client.request("GET", route)
        assert (reply.status, reply.content_type, reply.body) == (200, content_type, body), route
        assert reply.headers["content-length"] == str(len(body)), route


def test_response_passes_through(make_app: MakeApp) -> None:
    srv, client = make_app()

    def created(request: Request) -> Response:
        return Response("made", status=201, headers={"X-Custom": "1"}, mimetype="text/csv")

    _deploy(srv, created)
    reply = client.request("GET", "/f")
    assert (reply.status, reply.text, reply.headers["x-custom"]) == (201, "made", "1")
    assert reply.content_type == "text/csv; charset=utf-8"


def test_unencodable_result_is_500(make_app: MakeApp) -> None:
    srv, client = make_app()
    _deploy(srv, lambda request: object())
    assert client.request("GET", "/f").status == 500


def test_backend_error_is_500_with_error_id(make_app: MakeApp, caplog: pytest.LogCaptureFixture) -> None:
    srv, client = make_app()

    def broken(request: Request) -> None:
        raise ValueError("secret detail")

    _deploy(srv, broken)
    with caplog.at_level(logging.ERROR, logger="serve_core.http"):
        reply = client.request("GET", "/f")
    assert reply.status == 500 and reply.content_type == "text/plain; charset=utf-8"
    assert "secret detail" not in reply.text and "Traceback" not in reply.text
    error_id = reply.text.split("error id ")[1].split(")")[0]
    record = next(r for r in caplog.records if error_id in r.getMessage())
    assert record.exc_info is not None and "secret detail" in str(record.exc_info[1])


def test_debug_puts_the_traceback_in_the_body(make_app: MakeApp) -> None:
    srv, client = make_app(debug=True)

    def broken(request: Request) -> None:
        raise ValueError("secret detail")

    _deploy(srv, broken)
    reply = client.request("GET", "/f")
    assert reply.status == 500 and "Traceback" in reply.text and "secret detail" in reply.text


def test_body_larger_than_limit_is_413(make_app: MakeApp) -> None:
    srv, client = make_app(max_body_bytes=10)
    calls: list[int] = []

    def count_and_echo(request):
        calls.append(1)
        return request.get_data()

    _deploy(srv, count_and_echo, methods=("POST",))
    assert client.request("POST", "/f", data=b"x" * 10).body == b"x" * 10
    reply = client.request("POST", "/f", data=b"x" * 11)
    assert reply.status == 413 and "limit of 10" in reply.text
    assert calls == [1]


def test_overload_is_503_with_retry_after(make_app: MakeApp) -> None:
    srv, client = make_app(max_pending_per_endpoint=0)
    srv.create_endpoint("f", "/f")  # no traffic: the pending queue (size 0) is full at once
    reply = client.request("GET", "/f")
    assert reply.status == 503 and reply.headers["retry-after"] == "1"


def test_deadline_passed_is_504(make_app: MakeApp) -> None:
    srv, client = make_app(pending_timeout_s=0.05)
    srv.create_endpoint("f", "/f")  # no traffic: the query expires after pending_timeout_s
    reply = client.request("GET", "/f")
    assert reply.status == 504 and "no traffic" in reply.text


def test_unanswered_request_is_504_and_withdrawn_from_the_queue(make_app: MakeApp) -> None:
    srv, client = make_app(http_request_timeout_s=0.05)
    gate, calls = threading.Event(), []

    def backend(request: Any) -> str:
        calls.append(request.args["n"] if serve.context.web else "python")
        gate.wait(WAIT)  # holds the only replica until the test opens the gate
        return "late"

    _deploy(srv, backend)  # its first call: on the replica's thread (caller-runs needs short calls first)
    running = client.request("GET", "/f?n=1")  # runs, but its answer comes too late
    queued = client.request("GET", "/f?n=2")  # waits behind it, then gives up
    assert (running.status, queued.status) == (504, 504)
    assert "within 0.05 s" in queued.text
    gate.set()
    assert srv.get_handle("f").remote().result(WAIT) == "late"  # queued after n=2: n=2 never ran
    assert calls == ["1", "python"]


def test_a_request_runs_its_call_in_its_own_thread_once_the_backend_proved_fast(make_app: MakeApp) -> None:
    """Caller-runs under a request timeout: a backend's first call goes to its replica's thread
    (where the timeout can answer for it); once its calls proved short, a request runs its own."""
    srv, client = make_app(http_request_timeout_s=60)
    threads: list[str] = []

    def backend(request: Any) -> str:
        threads.append(threading.current_thread().name)
        return request.args["n"]

    _deploy(srv, backend)
    assert [client.request("GET", f"/f?n={n}").body for n in (1, 2)] == [b"1", b"2"]
    assert threads[0].startswith("serve-replica-") and not threads[1].startswith("serve-replica-")


def test_a_backends_own_timeout_error_is_its_answer(make_app: MakeApp) -> None:
    srv, client = make_app(http_request_timeout_s=60)

    def backend(request: Any) -> None:
        raise TimeoutError("the database did not answer")

    _deploy(srv, backend)
    assert client.request("GET", "/f").status == 500


@pytest.mark.parametrize("value", [0, -1, float("inf"), "10"])
def test_request_timeout_is_validated(make_serve: Callable[..., Serve], value: Any) -> None:
    with pytest.raises(serve.ValidationError, match="http_request_timeout_s"):
        make_serve(http_request_timeout_s=value)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "10"])
def test_max_body_bytes_is_validated(make_serve: Callable[..., Serve], value: Any) -> None:
    with pytest.raises(serve.ValidationError, match="max_body_bytes"):
        make_serve(max_body_bytes=value)


def test_stopped_instance_is_503(make_serve: Callable[..., Serve]) -> None:
    from .helpers import InProcess

    srv = make_serve()
    _deploy(srv, lambda request: "x")
    client = InProcess(srv)
    srv.shutdown()
    assert client.request("GET", "/f").status == 503
    assert client.request("GET", "/-/healthz").status == 503


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, request: Request) -> str:
        self.calls += 1
        return "call"

    def a(self, request: Request) -> str:
        self.calls += 1
        return "a"

    def count(self) -> int:
        return self.calls

    def _secret(self, request: Request) -> str:
        self.calls += 1
        return "secret"


def test_call_method_header(make_app: MakeApp) -> None:
    srv, client = make_app()
    _deploy(srv, Counter)
    handle = srv.get_handle("f").options(method_name="count")
    assert client.request("GET", "/f").text == "call"
    assert client.request("GET", "/f", headers={"X-SERVE-CALL-METHOD": "a"}).text == "a"
    for bad in ("_secret", "__init__", "__class__", "missing", ""):
        reply = client.request("GET", "/f", headers={"X-SERVE-CALL-METHOD": bad})
        assert reply.status in (400, 404), bad
    assert handle.remote().result() == 2  # no side effect from the rejected calls


def test_split_50_50_over_http(make_app: MakeApp) -> None:
    srv, client = make_app(rng=random.Random(7))
    srv.create_endpoint("e", "/e")
    srv.create_backend(lambda request: "v1", "e:v1")
    srv.create_backend(lambda request: "v2", "e:v2")
    srv.split("e", {"e:v1": 0.5, "e:v2": 0.5})
    answers = [client.request("GET", "/e").text for _ in range(100)]
    assert 25 <= answers.count("v1") <= 75 and answers.count("v1") + answers.count("v2") == 100


@pytest.mark.parametrize(
    ("queued", "in_flight", "mean_call_s", "expected"),
    [
        (4, 1, 0.5, 2.0),  # 4 queued at 2 per second
        (40, 4, 0.5, 5.0),  # 4 replicas (or slots) serve 8 per second
        (3, 1, 0.1, 1.0),  # under a second: the lower bound
        (10_000, 1, 0.5, 60.0),  # the upper bound
        (10, 0, 0.5, 1.0),  # nothing in flight: no rate
        (10, 2, 0.0, 1.0),  # no recent call: no rate
    ],
)
def test_retry_after_hint_is_queue_over_service_rate_bounded(
    queued: int, in_flight: int, mean_call_s: float, expected: float
) -> None:
    assert retry_after_hint(queued, in_flight, mean_call_s) == expected


def test_full_queue_retry_after_from_queue_length_and_service_rate(make_serve: Callable[..., Serve]) -> None:
    executor, clock = ScriptedExecutor(), FakeClock()
    srv = make_serve(executor=executor, clock=clock)
    _deploy(srv, lambda request: "ok", max_queue_size=4)
    handle = srv.get_handle("f")
    (replica,) = executor.started
    answered = []
    for _ in range(3):  # three calls of 0.5 s on the fake clock: 2 per second
        answered.append(handle.remote())
        clock.advance(0.5)
        replica.complete()
    held = [handle.remote() for _ in range(5)]  # one on the replica, four queued: the queue is full
    with pytest.raises(BackPressureError) as refused:
        handle.remote()
    assert refused.value.retry_after_s == 2.0  # 4 queued / (1 in flight / 0.5 s)
    reply = InProcess(srv).request("GET", "/f")
    assert (reply.status, reply.headers["retry-after"]) == (503, "2")
    while replica.held:
        replica.complete()
    assert all(future.result(0) == "ok" for future in answered + held)

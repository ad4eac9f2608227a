"""The standalone server's connections: keep-alive, framing, the idle timeout, ``100 Continue`` and early 413.

Raw sockets (:class:`~tests.http.helpers.Wire`), so that what ``requests`` hides is seen:
which connection answered, the ``Connection`` header, every ``100 Continue``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.wrappers import Response

from serve_core import Serve
from serve_core.http.server import SKIP_LIMIT, HTTPServer

from ..conftest import WAIT
from ..procs import wait_until
from .helpers import Wire

LIMIT = 1 << 20  # max_body_bytes of the instance under test
ServeOn = Callable[..., HTTPServer]


@pytest.fixture
def calls() -> list[str]:
    """Every call of ``/echo``'s backend."""
    return []


@pytest.fixture
def srv(make_serve: Callable[..., Serve], calls: list[str]) -> Serve:
    """An instance with ``/echo`` (the body), ``/port`` (the client's port) and ``/stream`` (no length)."""
    instance = make_serve(executor="thread", max_body_bytes=LIMIT)

    def echo(request: Any) -> bytes:
        calls.append("echo")
        return bytes(request.get_data())

    backends: dict[str, Any] = {
        "echo": echo,
        "port": lambda request: str(request.environ["REMOTE_PORT"]),
        "stream": lambda request: Response(iter([b"a", b"b"])),
    }
    for name, backend in backends.items():
        instance.create_endpoint(name, f"/{name}", methods=["GET", "POST"])
        instance.create_backend(backend, f"{name}:v1")
        instance.link(name, f"{name}:v1")
    return instance


@pytest.fixture
def serve_on() -> Iterator[ServeOn]:
    """Start a standalone server for an app on a free loopback port; closed after the test."""
    servers: list[HTTPServer] = []

    def start(app: Any, **options: Any) -> HTTPServer:
        servers.append(HTTPServer(app, "127.0.0.1", 0, **options))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def wire(srv: Serve, serve_on: ServeOn) -> Iterator[Wire]:
    connection = Wire(serve_on(srv.wsgi_app()).address)
    yield connection
    connection.close()


def _request(
    method: str, path: str, body: bytes = b"", *, version: str = "HTTP/1.1", headers: dict[str, str] | None = None
) -> bytes:
    lines = [f"{method} {path} {version}", "Host: test"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# ---------------------------------------------------------------- keep-alive
def test_two_requests_share_one_connection(srv: Serve, serve_on: ServeOn) -> None:
    server = serve_on(srv.wsgi_app())
    wire = Wire(server.address)
    try:
        replies = []
        for _ in range(2):
            wire.send(_request("GET", "/port"))
            replies.append(wire.response())
        assert [r.status for r in replies] == [200, 200]
        assert all(r.headers.get("connection") != "close" for r in replies)
        assert replies[0].body == replies[1].body == str(wire.sock.getsockname()[1]).encode()
        assert server.open_connections == 1
    finally:
        wire.close()


def test_pipelined_requests_are_answered_in_order(wire: Wire) -> None:
    wire.send(_request("POST", "/echo", b"first") + _request("POST", "/echo", b"second") + _request("GET", "/port"))
    assert [wire.response().body for _ in range(2)] == [b"first", b"second"]
    assert wire.response().status == 200


def test_a_small_unread_body_is_skipped_and_the_connection_kept(wire: Wire) -> None:
    wire.send(_request("POST", "/nowhere", b"x" * 100))  # 404: the app never reads the body
    reply = wire.response()
    assert reply.status == 404 and reply.headers.get("connection") != "close"
    wire.send(_request("GET", "/port"))
    assert wire.response().status == 200


def test_a_large_unread_body_closes_the_connection(wire: Wire) -> None:
    assert SKIP_LIMIT < 512 * 1024 < LIMIT
    wire.send(_request("POST", "/nowhere", headers={"Content-Length": str(512 * 1024)}))  # the body is never sent
    reply = wire.response()
    assert reply.status == 404 and reply.headers["connection"] == "close"
    assert wire.closed_by_server()


def test_a_response_without_length_is_chunked_and_keeps_the_connection(wire: Wire) -> None:
    wire.send(_request("GET", "/stream"))
    reply = wire.response()
    assert (reply.headers["transfer-encoding"], reply.body) == ("chunked", b"ab")
    assert reply.headers.get("connection") != "close"
    wire.send(_request("GET", "/stream"))
    assert wire.response().body == b"ab"


def test_a_chunked_request_body_read_to_its_end_keeps_the_connection(wire: Wire) -> None:
    chunked = b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    wire.send(_request("POST", "/echo", headers={"Transfer-Encoding": "chunked"}) + chunked + _request("GET", "/port"))
    reply = wire.response()
    assert (reply.body, reply.headers.get("connection")) == (b"abcde", None)
    assert wire.response().status == 200


def test_a_body_past_its_content_length_is_cut_and_the_connection_kept(serve_on: ServeOn) -> None:
    def overlong(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Content-Length", "3")])
        return [b"abcdef"]

    wire = Wire(serve_on(overlong).address)
    try:
        for _ in range(2):
            wire.send(_request("GET", "/"))
            assert wire.response().body == b"abc"
    finally:
        wire.close()


def test_an_app_that_raises_gets_a_500_and_the_connection_closes(
    serve_on: ServeOn, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        raise RuntimeError("broken app")

    wire = Wire(serve_on(broken).address)
    try:
        wire.send(_request("GET", "/"))
        reply = wire.response()
        assert (reply.status, reply.headers["connection"]) == (500, "close") and "error id" in reply.text
        assert wire.closed_by_server()
        assert any("broken app" in str(record.exc_info and record.exc_info[1]) for record in caplog.records)
    finally:
        wire.close()


def test_http10_keeps_the_connection_only_when_asked(wire: Wire) -> None:
    wire.send(_request("GET", "/port", version="HTTP/1.0", headers={"Connection": "keep-alive"}))
    assert wire.response().headers["connection"] == "keep-alive"
    wire.send(_request("GET", "/stream", version="HTTP/1.0", headers={"Connection": "keep-alive"}))
    reply = wire.response()  # HTTP/1.0 has no chunks: the body ends with the connection
    assert (reply.body, reply.headers["connection"]) == (b"ab", "close")
    assert "transfer-encoding" not in reply.headers


def test_http10_without_keep_alive_closes(wire: Wire) -> None:
    wire.send(_request("GET", "/port", version="HTTP/1.0"))
    assert wire.response().headers["connection"] == "close"
    assert wire.closed_by_server()


def test_an_idle_connection_is_closed_after_the_idle_timeout(srv: Serve, serve_on: ServeOn) -> None:
    server = serve_on(srv.wsgi_app(), idle_timeout_s=0.3)
    wire = Wire(server.address)
    try:
        wire.send(_request("GET", "/port"))
        assert wire.response().status == 200
        answered = time.monotonic()
        assert wire.closed_by_server()  # waits for it, up to WAIT
        assert time.monotonic() - answered >= 0.2  # kept until then (0.3 s less the time to read the answer)
        assert wait_until(lambda: server.open_connections == 0, WAIT)
    finally:
        wire.close()


def test_close_ends_a_kept_connection(srv: Serve, serve_on: ServeOn) -> None:
    server = serve_on(srv.wsgi_app())
    wire = Wire(server.address)
    try:
        wire.send(_request("GET", "/port"))
        assert wire.response().status == 200
        server.close()
        assert wire.closed_by_server()
        assert server.open_connections == 0
    finally:
        wire.close()


# ------------------------------------------------------- 100 Continue and 413
@pytest.mark.parametrize("expect", [True, False], ids=["expect-100", "no-expect"])
def test_declared_body_past_the_limit_is_413_at_once(calls: list[str], wire: Wire, expect: bool) -> None:
    headers = {"Content-Length": str(2 * LIMIT)} | ({"Expect": "100-continue"} if expect else {})
    wire.send(_request("POST", "/echo", headers=headers))  # headers only
    reply = wire.response()  # the first thing back is the 413, not a 100 Continue
    assert (reply.status, reply.headers["connection"]) == (413, "close") and "limit of" in reply.text
    assert wire.closed_by_server()
    assert calls == []


def test_expect_continue_gets_exactly_one_continue(wire: Wire) -> None:
    wire.send(_request("POST", "/echo", headers={"Content-Length": "5", "Expect": "100-continue"}))
    assert wire.head() == (100, {})
    wire.send(b"hello")
    reply = wire.response()
    assert (reply.status, reply.body) == (200, b"hello") and reply.headers.get("connection") != "close"
    wire.send(_request("GET", "/port"))
    assert wire.response().status == 200  # no second 100 Continue was waiting in the stream


def test_a_request_the_app_refuses_gets_no_continue(srv: Serve, serve_on: ServeOn, calls: list[str]) -> None:
    mounted = DispatcherMiddleware(Response(status=404), {"/serve": srv.wsgi_app()})  # the limit is the app's
    server = serve_on(mounted)
    assert server.max_body_bytes is None
    for path, length, status in [("/serve/nowhere", 10, 404), ("/serve/echo", 2 * LIMIT, 413)]:
        wire = Wire(server.address)
        try:
            wire.send(_request("POST", path, headers={"Content-Length": str(length), "Expect": "100-continue"}))
            assert wire.response().status == status
            assert wire.closed_by_server()  # the client may still send the body: the connection goes
        finally:
            wire.close()
    assert calls == []


def test_the_server_takes_the_body_limit_from_the_app(srv: Serve, serve_on: ServeOn) -> None:
    assert serve_on(srv.wsgi_app()).max_body_bytes == LIMIT
    assert serve_on(srv.wsgi_app(), max_body_bytes=10).max_body_bytes == 10

"""Streamed HTTP responses through a real socket on every executor (docs/streaming.md)."""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import Client
from werkzeug.wrappers import Response

from serve_core import Serve

from ..conftest import WAIT
from ..streaming_backends import endless, failing, held, make_event, web_stream, with_context
from .helpers import Wire


@pytest.fixture
def event(executor: str) -> Iterator[Callable[[], Any]]:
    managers: list[Any] = []
    yield lambda: make_event(executor, managers)
    for manager in managers:
        manager.shutdown()


@pytest.fixture
def served(make_serve: Callable[..., Serve], executor: str) -> Serve:
    return make_serve(executor=executor, start_server=True, http_port=0, blocking=True)


def _route(srv: Serve, name: str, target: Any, *init_args: Any) -> None:
    srv.create_endpoint(name, f"/{name}")
    srv.create_backend(target, f"{name}:v1", *init_args)
    srv.link(name, f"{name}:v1")


class Chunks:
    """A raw HTTP/1.1 client reading a chunked body chunk by chunk."""

    def __init__(self, srv: Serve, path: str, accept: str | None = None) -> None:
        address = srv.http_address()
        assert address is not None
        self.wire = Wire(address)
        extra = f"Accept: {accept}\r\n" if accept else ""
        self.wire.send(f"GET {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode())
        self.status, self.headers = self.wire.head()
        self._file = self.wire._file

    def chunk(self) -> bytes | None:
        """The next chunk's data; None at the terminating chunk. Raises ConnectionError when the body was cut."""
        line = self._file.readline()
        if not line:
            raise ConnectionError("the body ended without its terminating chunk")
        size = int(line.strip(), 16)
        if size == 0:
            self._file.readline()
            return None
        data = self._file.read(size)
        self._file.readline()
        return data

    def rest(self) -> bytes:
        parts = []
        while (data := self.chunk()) is not None:
            parts.append(data)
        return b"".join(parts)

    def close(self) -> None:
        self.wire.close()


class Held:
    def __init__(self, release: Any) -> None:
        self.release = release

    def __call__(self, request: Any) -> Any:
        return held(self.release)


class Endless:
    def __init__(self, finished: Any) -> None:
        self.finished = finished

    def __call__(self, request: Any) -> Any:
        return endless(self.finished)


def test_the_first_chunk_leaves_before_the_last_item_exists(served: Serve, event: Callable[[], Any]) -> None:
    release = event()
    _route(served, "h", Held, release)
    client = Chunks(served, "/h")
    try:
        assert client.status == 200
        assert client.headers["transfer-encoding"] == "chunked"
        assert client.headers["content-type"] == "text/plain; charset=utf-8"
        # The producer is blocked on `release`, set only now: this chunk left before the rest existed.
        assert client.chunk() == b"first\n"
        release.set()
        assert client.rest() == b'{"n": 1}\nraw\n'
    finally:
        client.close()


def test_json_items_are_one_document_per_line(served: Serve) -> None:
    _route(served, "w", web_stream)
    client = Chunks(served, "/w?kind=json")
    try:
        assert client.headers["content-type"] == "application/x-ndjson"
        lines = client.rest().decode().splitlines()
        assert [json.loads(line) for line in lines] == [{"i": 0}, {"i": 1}, {"i": 2}]
    finally:
        client.close()


def test_server_sent_events_framing(served: Serve) -> None:
    _route(served, "w", web_stream)
    client = Chunks(served, "/w?kind=json", accept="text/event-stream")
    try:
        assert client.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert client.headers["cache-control"] == "no-cache"
        assert client.rest() == b'data: {"i": 0}\n\ndata: {"i": 1}\n\ndata: {"i": 2}\n\n'
    finally:
        client.close()
    client = Chunks(served, "/w", accept="text/html, text/event-stream;q=0.9")
    try:  # a multi-line item is one event of several data lines
        assert client.rest() == b"data: line 0\ndata: \n\ndata: line 1\ndata: \n\ndata: line 2\ndata: \n\n"
    finally:
        client.close()


def test_a_client_that_disconnects_stops_the_generator(served: Serve, event: Callable[[], Any]) -> None:
    finished = event()
    _route(served, "e", Endless, finished)
    client = Chunks(served, "/e")
    assert client.chunk() is not None
    client.wire.sock.shutdown(socket.SHUT_RDWR)
    client.close()
    assert finished.wait(WAIT), "the generator's finally did not run after the client left"
    # The replica is free for the next request.
    client = Chunks(served, "/e")
    try:
        assert client.chunk() is not None
    finally:
        client.close()


def test_an_error_mid_stream_cuts_the_body_without_a_traceback(
    served: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    _route(served, "f", Failing)
    client = Chunks(served, "/f")
    try:
        assert client.chunk() == b"item 0\n"
        with pytest.raises(ConnectionError):
            client.rest()
    finally:
        client.close()
    logged = [r for r in caplog.records if "failed mid-way" in r.getMessage()]
    assert len(logged) == 1 and re.search(r"error id [0-9a-f]{12}", logged[0].getMessage())


def test_an_error_mid_stream_is_an_error_event(served: Serve, caplog: pytest.LogCaptureFixture) -> None:
    _route(served, "f", Failing)
    client = Chunks(served, "/f", accept="text/event-stream")
    try:
        body = client.rest()
    finally:
        client.close()
    match = re.fullmatch(rb'data: item 0\ndata: \n\nevent: error\ndata: \{"error_id": "([0-9a-f]{12})"\}\n\n', body)
    assert match, body
    assert b"Traceback" not in body and b"fell over" not in body
    assert any(match.group(1).decode() in r.getMessage() for r in caplog.records)


def test_an_error_before_the_first_item_is_a_500(served: Serve) -> None:
    _route(served, "f", FailingAtOnce)
    address = served.http_address()
    assert address is not None
    wire = Wire(address)
    try:
        wire.send(b"GET /f HTTP/1.1\r\nHost: test\r\n\r\n")
        reply = wire.response()
    finally:
        wire.close()
    assert reply.status == 500
    assert b"error id" in reply.body and b"Traceback" not in reply.body


class Failing:
    def __call__(self, request: Any) -> Any:
        return failing(1)


class FailingAtOnce:
    def __call__(self, request: Any) -> Any:
        return failing(0)


def test_mounted_in_a_wsgi_app(make_serve: Callable[..., Serve]) -> None:
    """The WSGI app streams wherever it is mounted: its body is an iterable of the items as they come."""
    srv = make_serve(executor="thread")
    release = threading.Event()
    _route(srv, "h", Held, release)
    outer = DispatcherMiddleware(Response("outer"), {"/serve": srv.wsgi_app()})
    response = Client(outer).get("/serve/h", buffered=False)
    assert response.status_code == 200 and response.mimetype == "text/plain"
    chunks: Iterator[bytes] = iter(response.response)  # type: ignore[arg-type]
    assert next(chunks) == b"first\n"  # before the producer was released
    release.set()
    assert b"".join(chunks) == b'{"n": 1}\nraw\n'
    response.close()


def test_the_generator_body_sees_the_web_call_context(served: Serve) -> None:
    _route(served, "c", with_context)
    client = Chunks(served, "/c")
    try:
        body = client.rest()
    finally:
        client.close()
    assert body == b"true\n" + client.headers["x-request-id"].encode()

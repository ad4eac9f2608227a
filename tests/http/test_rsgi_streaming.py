"""Streams and client disconnects under Granian (``serve-core run --server granian``: the RSGI front)."""

from __future__ import annotations

import importlib.util
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import WAIT, require
from ..procs import wait_until
from .helpers import Wire, granian_app

REPO = Path(__file__).resolve().parents[2]

APP = """
import serve_core as serve
from tests.http import granian_streams as backends

for name in ("held", "endless", "failing", "waiting", "flags"):
    serve.create_endpoint(name, "/" + name)
    serve.create_backend(getattr(backends, name), name + ":v1")
    serve.link(name, name + ":v1")
"""


@pytest.fixture(scope="module")
def granian(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    require(importlib.util.find_spec("granian") is not None, "granian is not installed")
    ready = lambda address: _flags(address) is not None  # noqa: E731
    with granian_app(tmp_path_factory.mktemp("granian-streams"), APP, ready) as address:
        yield address


def _flags(address: tuple[str, int], query: str = "") -> dict[str, bool] | None:
    wire = Wire(address)
    try:
        wire.send(f"GET /flags{query} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
        reply = wire.response()
    finally:
        wire.close()
    return json.loads(reply.body) if reply.status == 200 else None


def _open(address: tuple[str, int], path: str, accept: str = "") -> Wire:
    wire = Wire(address)
    extra = f"Accept: {accept}\r\n" if accept else ""
    wire.send(f"GET {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode())
    return wire


def _chunk(wire: Wire) -> bytes | None:
    size = int(wire._file.readline().strip(), 16)
    data = wire._file.read(size) if size else None
    wire._file.readline()
    return data


def test_the_first_chunk_leaves_before_the_last_item_exists(granian: tuple[str, int]) -> None:
    wire = _open(granian, "/held")
    try:
        status, headers = wire.head()
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        assert headers["content-type"] == "text/plain; charset=utf-8"
        assert _chunk(wire) == b"first\n"  # the producer waits for the release, sent only now
        assert _flags(granian, "?release=1") is not None
        assert _chunk(wire) == b'{"n": 1}\n'
        assert _chunk(wire) is None
    finally:
        wire.close()


def test_server_sent_events_and_an_error_event(granian: tuple[str, int]) -> None:
    wire = _open(granian, "/failing", accept="text/event-stream")
    try:
        status, headers = wire.head()
        assert headers["content-type"] == "text/event-stream; charset=utf-8"
        body = b""
        while (data := _chunk(wire)) is not None:
            body += data
    finally:
        wire.close()
    assert body.startswith(b"data: a\n\nevent: error\ndata: {\"error_id\": ")
    assert b"Traceback" not in body and b"fell over" not in body


def test_a_client_that_disconnects_stops_the_generator(granian: tuple[str, int]) -> None:
    wire = _open(granian, "/endless")
    wire.head()
    assert _chunk(wire)
    wire.sock.shutdown(socket.SHUT_RDWR)
    wire.close()
    assert wait_until(lambda: (_flags(granian) or {}).get("finished"), WAIT)


def test_a_running_async_call_is_cancelled_when_its_client_leaves(granian: tuple[str, int]) -> None:
    wire = _open(granian, "/waiting")
    assert wait_until(lambda: (_flags(granian) or {}).get("started"), WAIT)
    wire.close()
    assert wait_until(lambda: (_flags(granian) or {}).get("cancelled"), WAIT)

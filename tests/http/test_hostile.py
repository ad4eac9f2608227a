"""Hostile clients on the standalone server: deadlines for heads and bodies, eviction at the connection cap.

The issue's target: with slowloris connections (head bytes trickling), idle ones, or 64
stalled bodies open, a normal request is answered within 2 s. Here with 200 connections
(``bench/http_hostile.py`` runs 1,000), once under the default cap (a thread each) and
once past a cap of 100 (eviction). Trickles are paced by waiting for the server's answer
with a short timeout, so every wait is one for the server.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from serve_core import Serve, ValidationError
from serve_core.http.server import MAX_CONNECTIONS, HTTPServer

from ..conftest import WAIT
from ..procs import wait_until
from .helpers import Servers, Wire, timed_get, wait_readable

TARGET_S = 2.0  # the bound for a normal request while the attack is open
COUNT = 200  # attack connections per test
PARTIAL_HEAD = b"GET /-/healthz HTTP/1.1\r\nHost: test\r\nX-Slow: "


@pytest.fixture
def calls() -> list[bytes]:
    return []


@pytest.fixture
def app(make_serve: Callable[..., Serve], calls: list[bytes]) -> Any:
    """The WSGI app of an instance with ``/echo`` (POST: reads the body and returns it)."""
    srv = make_serve(executor="thread")

    def echo(request: Any) -> bytes:
        calls.append(bytes(request.get_data()))
        return calls[-1]

    srv.create_endpoint("echo", "/echo", methods=["POST"])
    srv.create_backend(echo, "echo:v1")
    srv.link("echo", "echo:v1")
    return srv.wsgi_app()


@pytest.fixture
def servers() -> Iterator[Servers]:
    started = Servers()
    yield started
    started.close()


@pytest.fixture
def crowd() -> Iterator[list[socket.socket]]:
    """The attack's connections, closed after the test."""
    sockets: list[socket.socket] = []
    yield sockets
    for sock in sockets:
        sock.close()


def _connect(server: HTTPServer, crowd: list[socket.socket], count: int) -> list[socket.socket]:
    for _ in range(count):
        crowd.append(socket.create_connection(server.address, timeout=WAIT))
    return crowd


def _trickle(wire: Wire, data: bytes, every: float) -> tuple[float, bytes]:
    """Send ``data`` a byte at a time, ``every`` seconds apart, until the server answers or closes.

    Returns how long it took from the first byte, and what the server sent first.
    """
    began = time.monotonic()
    for byte in data:
        try:
            wire.send(bytes([byte]))
        except OSError:
            break  # the server has closed: its answer, if any, is waiting
        if wait_readable(wire.sock, every):
            break
    assert wait_readable(wire.sock, WAIT), "the server neither answered nor closed"
    return time.monotonic() - began, wire.sock.recv(4096)


def _stalled_body(server: HTTPServer) -> Wire:
    wire = Wire(server.address)
    wire.send(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\nhello")
    return wire


# ------------------------------------------------------------------ deadlines
def test_a_trickled_head_gets_408_at_the_head_deadline(app: Any, servers: Servers) -> None:
    server = servers.start(app, head_timeout_s=0.5, idle_timeout_s=WAIT)
    wire = Wire(server.address)
    try:
        took, answer = _trickle(wire, PARTIAL_HEAD + b"x" * 1000, every=0.05)  # each byte well within idle
        assert answer.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in answer
        assert 0.4 <= took < 0.5 + TARGET_S
        assert wire.closed_by_server()
    finally:
        wire.close()


def test_a_silent_new_connection_is_closed_at_the_head_deadline_without_an_answer(
    app: Any, servers: Servers
) -> None:
    server = servers.start(app, head_timeout_s=0.3, idle_timeout_s=WAIT)
    wire = Wire(server.address)
    try:
        began = time.monotonic()
        assert wire.sock.recv(4096) == b""  # no 408 to a client that never started a request
        assert 0.25 <= time.monotonic() - began < 0.3 + TARGET_S
        assert wait_until(lambda: server.open_connections == 0, WAIT)
    finally:
        wire.close()


def test_a_kept_connection_waits_the_idle_timeout_then_its_head_has_the_head_deadline(
    app: Any, servers: Servers
) -> None:
    server = servers.start(app, head_timeout_s=0.3, idle_timeout_s=1.0)
    wire = Wire(server.address)
    try:
        wire.send(b"GET /-/healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        assert wire.response().status == 200
        assert not wait_readable(wire.sock, 0.5)  # idle past the head deadline: still open
        took, answer = _trickle(wire, PARTIAL_HEAD + b"x" * 100, every=0.05)
        assert answer.startswith(b"HTTP/1.1 408 ")  # the head deadline counts from its first byte
        assert 0.25 <= took < 0.3 + TARGET_S
    finally:
        wire.close()


def test_a_stalled_body_gets_408_at_the_body_deadline(app: Any, servers: Servers, calls: list[bytes]) -> None:
    server = servers.start(app, body_timeout_s=0.5, idle_timeout_s=WAIT)
    wire = _stalled_body(server)
    try:
        began = time.monotonic()
        reply = wire.response()
        assert (reply.status, reply.headers["connection"]) == (408, "close")
        assert 0.4 <= time.monotonic() - began < 0.5 + TARGET_S
        assert wire.closed_by_server()
    finally:
        wire.close()
    assert calls == []


def test_a_body_slower_than_the_minimum_rate_gets_408(app: Any, servers: Servers, calls: list[bytes]) -> None:
    server = servers.start(app, body_timeout_s=0.3, body_min_rate=100, idle_timeout_s=WAIT)
    wire = Wire(server.address)
    try:
        wire.send(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 1000\r\n\r\n")
        took, answer = _trickle(wire, b"x" * 1000, every=0.05)  # about 20 bytes/s
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert 0.3 <= took < 1.0 + TARGET_S  # 0.3 s plus 1 s per 100 bytes received: about 0.4 s
    finally:
        wire.close()
    assert calls == []


def test_a_body_faster_than_the_minimum_rate_is_served_past_the_body_timeout(
    app: Any, servers: Servers, calls: list[bytes]
) -> None:
    server = servers.start(app, body_timeout_s=0.3, body_min_rate=500, idle_timeout_s=WAIT)
    wire = Wire(server.address)
    try:
        wire.send(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 1200\r\n\r\n")
        began = time.monotonic()
        for _ in range(11):  # 100 bytes every 0.05 s: about 2,000 bytes/s for about 0.55 s
            wire.send(b"y" * 100)
            assert not wait_readable(wire.sock, 0.05)  # no 408 meanwhile
        wire.send(b"y" * 100)
        reply = wire.response()
        assert (reply.status, reply.body) == (200, b"y" * 1200)
        assert time.monotonic() - began > 0.3
    finally:
        wire.close()


def test_deadlines_must_be_positive(app: Any) -> None:
    for keyword in ("head_timeout_s", "body_timeout_s", "body_min_rate", "idle_timeout_s"):
        with pytest.raises(ValidationError, match=keyword):
            HTTPServer(app, "127.0.0.1", 0, **{keyword: 0})


# ------------------------------------------------------- crowds at the cap
CAPS = pytest.mark.parametrize("cap", [MAX_CONNECTIONS, COUNT // 2], ids=["thread-each", "eviction"])


@CAPS
def test_slowloris_connections_do_not_lock_out_a_normal_request(
    app: Any, servers: Servers, crowd: list[socket.socket], cap: int
) -> None:
    server = servers.start(app, max_connections=cap)
    _connect(server, crowd, COUNT)
    for data in (PARTIAL_HEAD, b"x"):  # the head's start, then one more byte, on those still open
        for sock in crowd:
            try:
                sock.sendall(data)
            except OSError:
                pass  # evicted
    status, took = timed_get(server.address)
    assert status == 200 and took < TARGET_S
    assert server.open_connections <= cap
    assert server.evictions >= (COUNT - cap + 1 if cap < COUNT else 0)


@CAPS
def test_idle_connections_do_not_lock_out_a_normal_request(
    app: Any, servers: Servers, crowd: list[socket.socket], cap: int
) -> None:
    server = servers.start(app, max_connections=cap)
    for _ in range(COUNT):  # each one answered, kept alive and silent before the next connects
        sock = _connect(server, crowd, 1)[-1]
        sock.sendall(b"GET /-/healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
    status, took = timed_get(server.address)
    assert status == 200 and took < TARGET_S
    assert server.open_connections <= cap


def test_stalled_bodies_do_not_lock_out_a_normal_request(app: Any, servers: Servers, calls: list[bytes]) -> None:
    server = servers.start(app, body_timeout_s=1.0)
    stalled = [_stalled_body(server) for _ in range(64)]
    try:
        assert wait_until(lambda: server.open_connections == 64, WAIT)
        status, took = timed_get(server.address)
        assert status == 200 and took < TARGET_S
        assert [wire.response().status for wire in stalled] == [408] * 64  # each at its body deadline
    finally:
        for wire in stalled:
            wire.close()
    assert calls == []


def test_idle_connections_are_evicted_first_then_the_oldest_unfinished_head(
    app: Any, servers: Servers, crowd: list[socket.socket]
) -> None:
    server = servers.start(app, max_connections=3)
    idle, old_head, new_head = _connect(server, crowd, 3)
    idle.sendall(b"GET /-/healthz HTTP/1.1\r\nHost: test\r\n\r\n")
    assert idle.recv(4096).startswith(b"HTTP/1.1 200 ")
    # Its handler enters the idle phase just after writing the answer: wait for it, or it is not evictable yet.
    assert wait_until(lambda: server.connection_phases() == {"head": 2, "idle": 1}, WAIT)
    old_head.sendall(PARTIAL_HEAD)
    new_head.sendall(PARTIAL_HEAD)
    newcomers = _connect(server, [], 1)  # at the cap: the idle one (and oldest connection) makes room
    assert idle.recv(4096) == b"" and not wait_readable(old_head, 0)
    newcomers[0].sendall(PARTIAL_HEAD)
    _connect(server, newcomers, 1)  # then the oldest unfinished head
    assert old_head.recv(4096) == b""
    try:
        for sock in [new_head, newcomers[0]]:  # the others are still there, and served
            sock.sendall(b"x\r\n\r\n")
        newcomers[1].sendall(b"GET /-/healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        for sock in [new_head, *newcomers]:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in newcomers:
            sock.close()
    assert server.evictions == 2


def test_when_every_connection_is_busy_a_new_one_gets_503(app: Any, servers: Servers) -> None:
    server = servers.start(app, max_connections=2)
    stalled = [_stalled_body(server) for _ in range(2)]
    try:
        # Both reading their bodies (not evictable): a connection still in its head phase would be evicted.
        assert wait_until(lambda: server.connection_phases() == {"body": 2}, WAIT)
        wire = Wire(server.address)
        reply = wire.response()
        wire.close()
        assert (reply.status, reply.headers["retry-after"], reply.headers["connection"]) == (503, "1", "close")
        assert server.evictions == 0
    finally:
        for wire in stalled:
            wire.close()

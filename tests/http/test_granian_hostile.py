"""Hostile clients and overload under Granian (``serve-core run --server granian``: the RSGI front).

The issue's targets: with slowloris connections, idle ones, or 64 stalled bodies open, a
normal request is answered within 2 s; a slow backend at 256 connections answers 503 with
``Retry-After`` while a no-op endpoint on the same instance keeps answering. Here with 200
slow or idle connections, 1,100 silent ones (past Granian's default cap of 1,024), 64
stalled bodies and the 256-connection overload (``bench/granian_overload.py`` runs 1,000
connections and reports latencies). One server for the module, with a body deadline of
2 s (``SERVE_CORE_BODY_TIMEOUT``) so a stalled body's 408 comes soon; every read is bounded.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import resource
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from werkzeug.test import Client

from serve_core import Serve

from ..conftest import WAIT, require
from .helpers import granian_app

REPO = Path(__file__).resolve().parents[2]
TARGET_S = 2.0  # the bound for a normal request while the attack is open
COUNT = 200  # slow or idle attack connections
SILENT = 1_100  # more than Granian's default backpressure (1,024 connections per worker)
BODY_TIMEOUT_S = 2.0
APP = """
import time

import serve_core as serve
from serve_core import BackendConfig
from werkzeug.wrappers import Response

serve.create_endpoint("noop", "/noop", methods=["GET", "POST"])
serve.create_backend(lambda request: "ok", "noop:v1")
serve.link("noop", "noop:v1")
serve.create_endpoint("echo", "/echo", methods=["POST"])
serve.create_backend(lambda request: bytes(request.get_data()), "echo:v1")
serve.link("echo", "echo:v1")
serve.create_endpoint("resp", "/resp")
serve.create_backend(lambda request: Response("made", status=201, headers={"X-Mine": "1"}), "resp:v1")
serve.link("resp", "resp:v1")


def slow(request):
    time.sleep(0.01)
    return "slow"


serve.create_endpoint("slow", "/slow")
serve.create_backend(slow, "slow:v1", backend_config=BackendConfig(max_queue_size=100))
serve.link("slow", "slow:v1")
"""
# The overload's client, in a process of its own: keep-alive connections calling /slow until
# stdin closes (at most 60 s); "ready" once the queue has answered 503, then the counts as JSON.
LOAD = r"""
import asyncio, json, sys, threading

port, connections = int(sys.argv[1]), int(sys.argv[2])
counts = {}
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()


async def caller():
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while not stop.is_set():
            writer.write(b"GET /slow HTTP/1.1\r\nHost: load\r\n\r\n")
            head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).lower()
            await reader.readexactly(int(head.split(b"content-length:")[1].split(b"\r\n")[0]))
            status = head.split(b" ")[1].decode()
            counts[status] = counts.get(status, 0) + 1
            if status == "503" and b"\r\nretry-after:" not in head:
                counts["503 without Retry-After"] = counts.get("503 without Retry-After", 0) + 1
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
        counts[type(exc).__name__] = counts.get(type(exc).__name__, 0) + 1
    finally:
        writer.close()


async def main():
    tasks = [asyncio.ensure_future(caller()) for _ in range(connections)]
    for _ in range(1000):  # up to 10 s for the queue to fill
        if "503" in counts:
            break
        await asyncio.sleep(0.01)
    print("ready", flush=True)
    await asyncio.wait_for(asyncio.to_thread(stop.wait, 60), 70)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)


asyncio.run(main())
print(json.dumps(counts), flush=True)
"""


# ------------------------------------------------------------------ the server
@pytest.fixture(scope="module")
def granian(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """``serve-core run --server granian`` of :data:`APP`, for the whole module."""
    require(importlib.util.find_spec("granian") is not None, "granian is not installed")
    ready = lambda address: _get(address, "/-/healthz")[0] == 200  # noqa: E731
    env = {"SERVE_CORE_BODY_TIMEOUT": str(BODY_TIMEOUT_S)}
    with granian_app(tmp_path_factory.mktemp("granian-hostile"), APP, ready, env) as address:
        yield address


@pytest.fixture
def crowd() -> Iterator[list[socket.socket]]:
    """The attack's connections, closed after the test."""
    sockets: list[socket.socket] = []
    yield sockets
    for sock in sockets:
        sock.close()


@pytest.fixture
def many_files() -> Iterator[None]:
    """Room for :data:`SILENT` connections in this process (the soft open-file limit raised)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = SILENT + 200
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the open-file hard limit ({hard}) is below {wanted}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _get(address: tuple[str, int], path: str = "/noop") -> tuple[int, float]:
    """One normal request on a new connection: its status and how long it took."""
    began = time.monotonic()
    with socket.create_connection(address, timeout=WAIT) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while b"\r\n" not in reply and (data := sock.recv(4096)):
            reply += data
    return int(reply.split()[1]), time.monotonic() - began


def _answered_in_time(address: tuple[str, int]) -> None:
    """A normal ``GET`` and a ``POST`` with a body, each answered 200 within the target."""
    status, took = _get(address)
    assert (status, took < TARGET_S) == (200, True), f"GET /noop: {status} after {took:.2f} s"
    began = time.monotonic()
    conn = http.client.HTTPConnection(*address, timeout=WAIT)
    try:
        conn.request("POST", "/echo", body=b"hello")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"hello")
    finally:
        conn.close()
    assert time.monotonic() - began < TARGET_S


def _connect(address: tuple[str, int], crowd: list[socket.socket], count: int, first: bytes = b"") -> None:
    for _ in range(count):
        sock = socket.create_connection(address, timeout=WAIT)
        crowd.append(sock)
        if first:
            sock.sendall(first)


# ------------------------------------------------------------------ hostile connections
def test_normal_requests_are_answered_while_slowloris_heads_trickle(
    granian: tuple[str, int], crowd: list[socket.socket]
) -> None:
    head = b"GET /noop HTTP/1.1\r\nHost: test\r\nX-Slow: "
    _connect(granian, crowd, COUNT, head[:1])
    for sent in range(1, 6):  # a byte more on every connection between normal requests
        for sock in crowd:
            sock.sendall(head[sent : sent + 1])
        _answered_in_time(granian)


def test_normal_requests_are_answered_while_idle_connections_are_kept(
    granian: tuple[str, int], crowd: list[socket.socket]
) -> None:
    _connect(granian, crowd, COUNT, b"GET /noop HTTP/1.1\r\nHost: test\r\n\r\n")
    for sock in crowd:  # each answered and kept open
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
    _answered_in_time(granian)
    assert not select.select(crowd, [], [], 0)[0], "an idle connection was closed before the head deadline"


def test_normal_requests_are_answered_past_granians_default_connection_cap(
    granian: tuple[str, int], crowd: list[socket.socket], many_files: None
) -> None:
    # Granian keeps a connection that never sends a byte, and stops accepting at its
    # backpressure (1,024 by default): run_granian sets it from the open-file limit.
    _connect(granian, crowd, SILENT)
    _answered_in_time(granian)


def test_stalled_bodies_hold_no_thread_and_get_408_at_the_body_deadline(
    granian: tuple[str, int], crowd: list[socket.socket]
) -> None:
    began = time.monotonic()
    _connect(granian, crowd, 64, b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\nhello")
    chunked = b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    _connect(granian, crowd, 1, chunked)
    _answered_in_time(granian)
    assert time.monotonic() - began < BODY_TIMEOUT_S, "too slow to see the stalled bodies open"
    for sock in crowd:
        assert select.select([sock], [], [], BODY_TIMEOUT_S + TARGET_S)[0], "no 408 by the body deadline"
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"\r\nconnection: close\r\n" in answer.lower()
        sock.settimeout(WAIT)
        assert sock.recv(4096) == b""  # closed: the rest of the body would be read as a request
    assert BODY_TIMEOUT_S - 0.1 <= time.monotonic() - began < BODY_TIMEOUT_S + TARGET_S


def test_a_declared_body_past_the_limit_is_refused_before_it_is_read(granian: tuple[str, int]) -> None:
    with socket.create_connection(granian, timeout=WAIT) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 99999999999\r\n\r\nhello")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413 ") and b"\r\nconnection: close\r\n" in answer.lower()


# ------------------------------------------------------------------ overload
def test_a_slow_endpoint_answers_503_with_retry_after_and_does_not_starve_a_noop_one(
    granian: tuple[str, int],
) -> None:
    load = subprocess.Popen(
        [sys.executable, "-c", LOAD, str(granian[1]), "256"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert load.stdin is not None and load.stdout is not None
    latencies: list[float] = []
    try:
        assert select.select([load.stdout], [], [], 3 * WAIT)[0], "the load did not start"
        assert load.stdout.readline() == "ready\n"
        conn = http.client.HTTPConnection(*granian, timeout=WAIT)
        for _ in range(100):  # back to back on one kept connection, while the load runs
            began = time.monotonic()
            conn.request("GET", "/noop")
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b"ok")
            latencies.append(time.monotonic() - began)
        conn.close()
    finally:
        out, err = load.communicate(timeout=6 * WAIT)  # closes its stdin: the load stops
    counts = json.loads(out.splitlines()[-1])
    latencies.sort()
    print(f"overload: {counts}; no-op p50 {latencies[50] * 1e3:.1f} ms, max {latencies[-1] * 1e3:.1f} ms")
    assert counts.get("503", 0) > 0 and counts.get("200", 0) > 0, counts
    assert "503 without Retry-After" not in counts, counts
    assert set(counts) <= {"200", "503"}, (counts, err)
    assert latencies[-1] < TARGET_S  # generous: the target is a p50 under 100 ms


# ------------------------------------------------------------------ the RSGI front is the WSGI app
REQUESTS: list[tuple[str, str, bytes, dict[str, str]]] = [
    ("GET", "/noop", b"", {}),
    ("HEAD", "/noop", b"", {}),
    ("POST", "/echo", b"hello", {"Content-Type": "application/octet-stream"}),
    ("OPTIONS", "/echo", b"", {}),
    ("PUT", "/echo", b"x", {}),
    ("GET", "/nowhere", b"", {}),
    ("GET", "/noop?relative_slo_ms=abc", b"", {}),
    ("GET", "/noop", b"", {"X-Serve-Call-Method": "_private"}),
    ("GET", "/noop", b"", {"X-Request-ID": "given-id.1"}),
    ("GET", "/noop", b"", {"X-Request-ID": "not valid!"}),
    ("GET", "/resp", b"", {}),
    ("GET", "/-/routes", b"", {}),
    ("GET", "/-/healthz", b"", {}),
]
COMPARED = ("content-type", "content-length", "allow", "x-mine")


def test_the_rsgi_front_answers_as_the_wsgi_app_does(
    granian: tuple[str, int], make_serve: Callable[..., Serve]
) -> None:
    srv = make_serve(executor="thread")
    exec(compile(APP.replace("import serve_core as serve", ""), "<app>", "exec"), {"serve": srv})
    client = Client(srv.wsgi_app())
    for method, path, body, headers in REQUESTS:
        expected = client.open(path, method=method, data=body, headers=headers)
        conn = http.client.HTTPConnection(*granian, timeout=WAIT)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            got = conn.getresponse()
            answer = got.read()
        finally:
            conn.close()
        where = f"{method} {path} {headers}"
        assert (got.status, answer) == (expected.status_code, expected.get_data()), where
        for name in COMPARED:
            assert got.getheader(name) == expected.headers.get(name), (where, name)
        request_id = got.getheader("x-request-id")
        assert request_id and (request_id == "given-id.1") == ("given-id.1" in headers.values()), where


def test_granian_options_have_the_head_deadline_and_a_cap_from_the_open_file_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require(importlib.util.find_spec("granian") is not None, "granian is not installed")
    from granian.constants import Interfaces

    from serve_core.http import granian as front

    limits: dict[str, Any] = {"now": (1024, 4096)}
    monkeypatch.setattr(resource, "getrlimit", lambda which: limits["now"])
    monkeypatch.setattr(resource, "setrlimit", lambda which, value: limits.update(now=value))
    options = front.granian_options(2)
    assert limits["now"] == (4096, 4096)  # raised to the hard limit
    assert options["backpressure"] == 4096 - front.FILES_RESERVED
    assert (options["interface"], options["workers"], options["websockets"]) == (Interfaces.RSGI, 2, False)
    assert options["http1_settings"].header_read_timeout == front.HEAD_TIMEOUT_S * 1000 == 10_000
    limits["now"] = (200, 200)  # a small limit: half of it, whatever the reserve
    assert front.connection_cap() == 100

"""A client that goes away cancels its call: withdrawn when queued, its task cancelled when it is a
running async call (the standalone server's disconnect watch, serve_core/http/disconnect.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from serve_core import Serve
from serve_core.http.disconnect import available

from ..conftest import WAIT
from ..procs import wait_until
from ..streaming_backends import Gated, Waiting, make_event
from .helpers import Wire

pytestmark = pytest.mark.skipif(not available(), reason="the disconnect watch needs epoll (Linux)")


@pytest.fixture
def event(executor: str) -> Iterator[Callable[[], Any]]:
    managers: list[Any] = []
    yield lambda: make_event(executor, managers)
    for manager in managers:
        manager.shutdown()


def _served(make_serve: Callable[..., Serve], executor: str, name: str, target: Any, *init_args: Any) -> Serve:
    srv = make_serve(executor=executor, start_server=True, http_port=0, blocking=True)
    srv.create_endpoint(name, f"/{name}")
    srv.create_backend(target, f"{name}:v1", *init_args)
    srv.link(name, f"{name}:v1")
    return srv


def _get(srv: Serve, path: str) -> Wire:
    address = srv.http_address()
    assert address is not None
    wire = Wire(address)
    wire.send(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    return wire


@pytest.mark.parametrize("executor", ["thread", "process", "ray"])
def test_a_running_async_call_is_cancelled_when_its_client_leaves(
    make_serve: Callable[..., Serve], executor: str, event: Callable[[], Any], caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
) -> None:
    if executor == "ray":
        request.getfixturevalue("ray_local")
    started, cancelled = event(), event()
    srv = _served(make_serve, executor, "w", Waiting, started, cancelled)
    wire = _get(srv, "/w")
    assert started.wait(WAIT)
    wire.close()
    assert cancelled.wait(WAIT), "the backend's task was not cancelled"
    assert wait_until(lambda: srv.stat()["w:v1_request_counter"] == 1, WAIT)  # answered (cancelled), once
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a cancelled call is no failure"


@pytest.mark.parametrize("executor", ["thread"])
def test_a_queued_call_is_withdrawn_when_its_client_leaves(
    make_serve: Callable[..., Serve], executor: str, event: Callable[[], Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="serve_core.access")
    started, gate = event(), event()
    calls: list[str] = []
    srv = _served(make_serve, executor, "g", Gated, started, gate, calls)
    first = _get(srv, "/g?n=1")
    assert started.wait(WAIT)  # the only replica is busy with the first call
    second = _get(srv, "/g?n=2")
    assert wait_until(lambda: srv.stat()["backend_g:v1_queue_size"] == 1, WAIT)
    second.close()
    # Answered 499 (for the access log: nobody reads it) while the replica is still busy.
    assert wait_until(lambda: any(getattr(r, "status", None) == 499 for r in caplog.records), WAIT)
    gate.set()
    try:
        reply = first.response()
    finally:
        first.close()
    assert (reply.status, reply.body) == (200, b"1")
    assert wait_until(lambda: srv.stat()["backend_g:v1_queue_size"] == 0, WAIT)
    assert calls == ["1"]  # the withdrawn call never ran

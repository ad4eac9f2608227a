"""``call_timeout_s``: a call that runs too long fails, its replica is replaced, the queued calls run."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest

from serve_core import BackendConfig, DeadlineExceededError, Serve, ValidationError

from .conftest import WAIT
from .procs import wait_until

MakeServe = Callable[..., Serve]


def stuck_or_quick(*, gate: Any = None) -> str:
    if gate is not None:
        gate.wait(4 * WAIT)  # stuck until the test lets it go
        return "late"
    return "quick"


def _deploy(srv: Serve, timeout: float) -> None:
    srv.create_endpoint("ep")
    srv.create_backend(stuck_or_quick, "b", backend_config=BackendConfig(call_timeout_s=timeout))
    srv.link("ep", "b")


def test_a_stuck_call_fails_and_its_replica_is_replaced(
    make_serve: MakeServe, make_gate: Callable[[], Any], concurrent_executor: str
) -> None:
    srv = make_serve(executor=concurrent_executor, drain_timeout_s=1.0)
    _deploy(srv, timeout=0.5)
    first = srv.replica_ids("b")
    gate = make_gate()
    handle = srv.get_handle("ep")
    stuck = handle.remote(gate=gate)
    queued = [handle.remote() for _ in range(3)]  # behind it, on the one replica
    with pytest.raises(DeadlineExceededError, match="call_timeout_s=0.5"):
        stuck.result(4 * WAIT)
    assert [f.result(4 * WAIT) for f in queued] == ["quick"] * 3  # served by the replacement
    assert wait_until(lambda: len(srv.replica_ids("b")) == 1 and srv.replica_ids("b") != first, 4 * WAIT)
    assert srv.stat()["b_error_counter"] == 1
    gate.set()  # a thread replica's abandoned call ends now; its late answer is dropped
    assert handle.remote().result(4 * WAIT) == "quick"


def test_inline_a_stuck_call_is_answered_by_its_timeout(make_serve: MakeServe) -> None:
    srv = make_serve(executor="inline", drain_timeout_s=0.5)
    _deploy(srv, timeout=0.3)
    gate = threading.Event()
    handle = srv.get_handle("ep")
    stuck: Future[Future[Any]] = Future()
    caller = threading.Thread(target=lambda: stuck.set_result(handle.remote(gate=gate)))
    caller.start()  # an inline call runs in its caller: this thread is stuck in remote()
    assert wait_until(lambda: srv.stat()["endpoint_ep_request_counter"] == 1, WAIT)
    queued = handle.remote()
    assert queued.result(WAIT) == "quick"  # the timeout replaced the replica, which ran it
    gate.set()
    caller.join(WAIT)
    with pytest.raises(DeadlineExceededError):
        stuck.result(WAIT).result(0)


def test_a_call_within_its_timeout_is_untouched(make_serve: MakeServe) -> None:
    from serve_core.testing import FakeClock

    clock = FakeClock()
    srv = make_serve(executor="thread", clock=clock)
    _deploy(srv, timeout=5.0)
    first = srv.replica_ids("b")
    assert srv.get_handle("ep").remote().result(WAIT) == "quick"
    clock.advance(10)  # the timer was cancelled when the call ended
    assert srv.replica_ids("b") == first
    with pytest.raises(ValidationError):
        BackendConfig(call_timeout_s=0)

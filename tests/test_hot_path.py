"""The router's request path: single calls, batches, expiry, cancellation, completion chains."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest

from serve_core import (
    BackendConfig,
    DeadlineExceededError,
    ReplicaDiedError,
    Serve,
    ServeHandle,
    accept_batch,
    context,
)
from serve_core.executors.base import Call, Outcome, ReplicaSpec
from serve_core.testing import FakeClock

from .conftest import WAIT


@pytest.fixture(params=["inline", "thread"])
def executor(request: pytest.FixtureRequest) -> str:
    """In-process executors only: these backends share threading primitives and handles with the test."""
    return str(request.param)


class Gate:
    """A backend whose first call blocks until released, so later queries queue up."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls: list[Any] = []
        self._lock = threading.Lock()

    def __call__(self, request: Any, x: Any = None) -> Any:
        with self._lock:
            first = not self.calls
            self.calls.append(x)
        if first:
            self.entered.set()
            if not self.release.wait(WAIT):
                raise TimeoutError("gate never released")
        return x

    def backend(self) -> Callable[..., Any]:
        """The gate as a function backend."""

        def gated(request: Any, x: Any = None) -> Any:
            return self(request, x)

        return gated


def _deploy(srv: Serve, backend: Any, config: BackendConfig | None = None) -> ServeHandle:
    srv.create_backend(backend, "b:v0", backend_config=config)
    srv.create_endpoint("e", None)
    srv.link("e", "b:v0")
    return srv.get_handle("e")


@pytest.fixture
def blocked_call() -> Iterator[Callable[[ServeHandle], Future[Any]]]:
    """Start a first call that blocks in the backend (from a helper thread, for inline)."""
    threads: list[threading.Thread] = []

    def start(handle: ServeHandle) -> Future[Any]:
        first: Future[Any] = Future()

        def call() -> None:
            try:
                first.set_result(handle.remote(x="first").result(WAIT))
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                first.set_exception(exc)

        thread = threading.Thread(target=call, name="test-first-call")
        threads.append(thread)
        thread.start()
        return first

    yield start
    for thread in threads:
        thread.join(WAIT)


def _held(
    srv: Serve, blocked_call: Callable[[ServeHandle], Future[Any]], config: BackendConfig | None = None
) -> tuple[Gate, ServeHandle, Future[Any]]:
    """Deploy a gated backend; returns the gate, the handle and the call holding the replica."""
    gate = Gate()
    handle = _deploy(srv, gate.backend(), config)
    first = blocked_call(handle)
    assert gate.entered.wait(WAIT)
    return gate, handle, first


def test_long_queue_drains_without_recursion(
    make_serve: Callable[..., Serve], executor: str, blocked_call: Callable[[ServeHandle], Future[Any]]
) -> None:
    gate, handle, first = _held(make_serve(executor=executor), blocked_call)
    queued = [handle.remote(x=i) for i in range(3000)]  # deeper than the recursion limit
    gate.release.set()
    assert first.result(WAIT) == "first"
    assert [f.result(WAIT) for f in queued] == list(range(3000))


def test_expired_single_calls_are_dropped(
    make_serve: Callable[..., Serve], executor: str, blocked_call: Callable[[ServeHandle], Future[Any]]
) -> None:
    clock = FakeClock()
    srv = make_serve(executor=executor, clock=clock)
    gate, handle, first = _held(srv, blocked_call, BackendConfig(drop_expired=True))
    late = handle.options(relative_slo_ms=10).remote(x="late")
    kept = handle.remote(x="kept")
    clock.advance(1.0)
    gate.release.set()
    assert first.result(WAIT) == "first"
    assert kept.result(WAIT) == "kept"
    with pytest.raises(DeadlineExceededError):
        late.result(WAIT)
    assert gate.calls == ["first", "kept"]


def test_cancelled_queued_query_is_skipped(
    make_serve: Callable[..., Serve], executor: str, blocked_call: Callable[[ServeHandle], Future[Any]]
) -> None:
    gate, handle, first = _held(make_serve(executor=executor), blocked_call)
    dropped = handle.remote(x="dropped")
    kept = handle.remote(x="kept")
    assert dropped.cancel()
    gate.release.set()
    assert first.result(WAIT) == "first"
    assert kept.result(WAIT) == "kept"
    assert gate.calls == ["first", "kept"]


def test_queued_queries_form_batches(
    make_serve: Callable[..., Serve], executor: str, blocked_call: Callable[[ServeHandle], Future[Any]]
) -> None:
    sizes: list[int] = []
    entered, release = threading.Event(), threading.Event()

    @accept_batch
    def batched(requests: list[Any], x: list[Any]) -> list[Any]:
        sizes.append(len(x))
        if x == ["first"]:
            entered.set()
            assert release.wait(WAIT)
        return x

    handle = _deploy(make_serve(executor=executor), batched, BackendConfig(max_batch_size=4))
    first = blocked_call(handle)
    assert entered.wait(WAIT)
    queued = [handle.remote(x=i) for i in range(6)]
    release.set()
    assert first.result(WAIT) == "first"
    assert [f.result(WAIT) for f in queued] == list(range(6))
    assert sizes == [1, 4, 2]


def test_nested_call_from_a_backend(srv: Serve) -> None:
    srv.create_backend(lambda request: "inner", "inner:v0")
    srv.create_endpoint("inner", None)
    srv.link("inner", "inner:v0")
    inner = srv.get_handle("inner")
    srv.create_backend(lambda request: "outer+" + inner.remote().result(WAIT), "outer:v0")
    srv.create_endpoint("outer", None)
    srv.link("outer", "outer:v0")
    assert srv.get_handle("outer").remote().result(WAIT) == "outer+inner"


class _BrokenReplica:
    default_max_concurrent_queries = 1

    def __init__(self, spec: ReplicaSpec) -> None:
        self.replica_id = spec.replica_id
        self.alive = True

    def submit(self, call: Call) -> Future[list[Outcome]]:
        raise RuntimeError("executor lost its worker")

    def stop(self, drain_timeout: float | None = None) -> None:
        self.alive = False


class _BrokenExecutor:
    name = "broken"
    places_replicas = False

    def start_replica(self, spec: ReplicaSpec) -> _BrokenReplica:
        return _BrokenReplica(spec)

    def shutdown(self) -> None:
        pass


def test_submit_that_raises_is_a_dead_replica(make_serve: Callable[..., Serve]) -> None:
    handle = _deploy(make_serve(executor=_BrokenExecutor()), lambda request: "never")
    with pytest.raises(ReplicaDiedError, match="lost its worker"):
        handle.remote().result(WAIT)


def test_context_is_set_during_the_call_only(srv: Serve) -> None:
    _deploy(srv, lambda request: (context.web, context.batch_size))
    assert srv.get_handle("e").remote().result(WAIT) == (False, None)
    assert (context.web, context.batch_size) == (False, None)

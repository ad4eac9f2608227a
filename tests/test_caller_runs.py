"""Caller-runs: a caller that blocks on the answer runs a synchronous call itself, under its replica.

``Serve.enqueue(..., caller_runs=True)`` (what the WSGI front does) on the thread executor:
the call runs in the caller's thread when its replica is free, still one call at a time per
replica, with ``serve.context`` set for the call and reset after it; errors and replica
failures answer as on the replica's thread; ``call_timeout_s`` and ``caller_runs=False``
keep calls on the replica's thread, and so does a caller with a timeout until the backend's
recent calls proved short (:mod:`serve_core.callerruns`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import serve_core as serve
from serve_core import BackendConfig, Serve
from serve_core.callerruns import RECENT_S, RecentLongest, may_run_here
from serve_core.errors import DeadlineExceededError, ReplicaDiedError
from serve_core.executors.base import Call, CallerRunsReplica, Outcome, ReplicaSpec
from serve_core.executors.thread import ThreadExecutor, ThreadReplica
from serve_core.testing import FakeClock

from .conftest import WAIT
from .procs import wait_until
from .scripted import ScriptedExecutor

REPLICA_THREAD = "serve-replica-"


def _deploy(srv: Serve, func: Any, **config: Any) -> None:
    srv.create_endpoint("f")
    srv.create_backend(func, "f:v1", backend_config=BackendConfig(**config))
    srv.link("f", "f:v1")


def _thread_name(request: Any = None) -> str:
    return threading.current_thread().name


def test_a_free_replica_runs_the_call_in_the_callers_thread(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="thread")
    _deploy(srv, _thread_name)
    future = srv.enqueue("f", caller_runs=True)
    assert future.done()  # answered before enqueue returned
    assert future.result(0) == threading.current_thread().name
    assert future.timing is None  # a Python call: no web timing, as on the replica's thread


def test_handle_calls_and_opted_out_backends_stay_on_the_replica_thread(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="thread")
    _deploy(srv, _thread_name, caller_runs=False)
    assert srv.enqueue("f", caller_runs=True).result(WAIT).startswith(REPLICA_THREAD)
    srv.create_endpoint("g")
    srv.create_backend(_thread_name, "g:v1")
    srv.link("g", "g:v1")
    assert srv.get_handle("g").remote().result(WAIT).startswith(REPLICA_THREAD)  # remote() does not block


def test_one_call_at_a_time_per_replica(make_serve: Callable[..., Serve]) -> None:
    """Callers racing for one replica: the replica never runs two calls at once, whoever runs them."""
    srv = make_serve(executor="thread")
    lock, running, seen = threading.Lock(), [0], []

    def backend(request: Any = None) -> None:
        with lock:
            running[0] += 1
            seen.append((running[0], threading.current_thread().name))
        for _ in range(50):
            time.sleep(0)  # not a wait: hands the GIL to the other callers, so an overlap would be seen
        with lock:
            running[0] -= 1

    _deploy(srv, backend, max_queue_size=10_000)
    start = threading.Barrier(8)

    def caller() -> None:
        start.wait(WAIT)
        for _ in range(25):
            srv.enqueue("f", caller_runs=True).result(WAIT)

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert len(seen) == 200
    assert max(count for count, _ in seen) == 1
    assert any(not name.startswith(REPLICA_THREAD) for _, name in seen)  # some ran in their callers


def test_serve_context_is_the_calls_and_reset_after_it(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="thread")
    _deploy(srv, lambda request=None: (serve.context.web, serve.context.batch_size, _thread_name()))
    web, batch_size, where = srv.enqueue("f", caller_runs=True).result(0)
    assert (web, batch_size, where) == (False, None, threading.current_thread().name)

    class FakeRequest:
        environ = {"serve_core.request_id": "abc"}

    srv.create_endpoint("w")
    srv.create_backend(lambda request: (serve.context.web, serve.context.request_id, _thread_name()), "w:v1")
    srv.link("w", "w:v1")
    web, request_id, where = srv.enqueue("w", request=FakeRequest(), caller_runs=True).result(0)
    assert (web, request_id, where) == (True, "abc", threading.current_thread().name)
    assert (serve.context.web, serve.context.request_id) == (False, None)  # the caller's own context again


def test_a_user_error_is_the_answer_and_the_replica_stays(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="thread")

    def backend(request: Any = None, fail: bool = False) -> str:
        if fail:
            raise SystemExit("user code exited")  # a BaseException: still the caller's answer
        return _thread_name()

    _deploy(srv, backend)
    (replica,) = srv.replicas("f:v1")
    with pytest.raises(SystemExit, match="user code exited"):
        srv.enqueue("f", kwargs={"fail": True}, caller_runs=True).result(0)
    assert srv.enqueue("f", caller_runs=True).result(0) == threading.current_thread().name
    assert srv.replicas("f:v1") == [replica]
    stats = srv.stat()
    assert (stats["f:v1_request_counter"], stats["f:v1_error_counter"]) == (2, 1)


class _Breaking(ThreadReplica):
    """A thread replica whose executor breaks when a caller runs a call (``run_here`` raises)."""

    def run_here(self, call: Call) -> list[Outcome]:
        raise RuntimeError("executor broke in run_here")


class _BreakingExecutor(ThreadExecutor):
    name = "breaking"

    def __init__(self) -> None:
        self.started: list[ThreadReplica] = []

    def start_replica(self, spec: ReplicaSpec) -> ThreadReplica:
        replica = (_Breaking if not self.started else ThreadReplica)(spec)
        self.started.append(replica)
        return replica


def test_a_replica_failing_in_the_callers_thread_dies_and_is_replaced(make_serve: Callable[..., Serve]) -> None:
    executor = _BreakingExecutor()
    srv = make_serve(executor=executor)
    _deploy(srv, _thread_name)
    assert isinstance(executor.started[0], CallerRunsReplica)
    with pytest.raises(ReplicaDiedError, match="executor broke in run_here"):
        srv.enqueue("f", caller_runs=True).result(WAIT)
    assert wait_until(lambda: srv.replicas("f:v1") == [executor.started[-1]] and len(executor.started) == 2, WAIT)
    assert srv.enqueue("f", caller_runs=True).result(WAIT) == threading.current_thread().name


def test_a_stopped_replica_sends_the_call_back_to_the_queue(make_serve: Callable[..., Serve]) -> None:
    """``run_here`` refusing (the replica stopped) is a call never delivered: another replica runs it."""
    srv = make_serve(executor="thread")
    _deploy(srv, _thread_name)
    (replica,) = srv.replicas("f:v1")
    assert isinstance(replica, ThreadReplica)
    replica.stop(WAIT)  # behind the runtime's back: it finds out on the next call
    where = srv.enqueue("f", caller_runs=True).result(WAIT)
    (fresh,) = srv.replicas("f:v1")
    assert fresh is not replica and where == f"{REPLICA_THREAD}{fresh.replica_id}"  # ran by the replacement


def test_call_timeout_keeps_the_call_on_the_replica_thread_and_enforced(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="thread")
    gate = threading.Event()

    def backend(request: Any = None, block: bool = False) -> str:
        if block:
            gate.wait(WAIT)
        return _thread_name()

    _deploy(srv, backend, call_timeout_s=0.05)
    try:
        assert srv.enqueue("f", caller_runs=True).result(WAIT).startswith(REPLICA_THREAD)
        blocked = srv.enqueue("f", kwargs={"block": True}, caller_runs=True)
        with pytest.raises(DeadlineExceededError, match="call_timeout_s"):
            blocked.result(WAIT)
    finally:
        gate.set()


def test_a_busy_replica_leaves_the_call_queued_for_its_thread(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="thread")
    entered, gate = threading.Event(), threading.Event()

    def backend(request: Any = None, block: bool = False) -> str:
        if block:
            entered.set()
            gate.wait(WAIT)
        return _thread_name()

    _deploy(srv, backend)
    running = srv.get_handle("f").remote(block=True)
    assert entered.wait(WAIT)
    queued = srv.enqueue("f", kwargs={}, caller_runs=True)
    assert not queued.done()  # the replica holds a call: this one waits in the queue
    gate.set()
    assert running.result(WAIT).startswith(REPLICA_THREAD)
    assert queued.result(WAIT).startswith(REPLICA_THREAD)


def test_recent_longest_keeps_the_longest_call_of_the_last_window() -> None:
    longest = RecentLongest(recent_s=60)
    assert longest.longest(0.0) is None
    longest.observe(2.0, 1.0)
    longest.observe(0.5, 20.0)
    assert longest.longest(25.0) == 2.0
    longest.observe(0.1, 40.0)  # a new half began at 31: 2.0 is in the previous one
    assert longest.longest(50.0) == 2.0
    assert longest.longest(75.0) == 0.1  # 2.0's half has gone
    assert longest.longest(200.0) is None  # nothing that recent


def test_may_run_here_needs_short_recent_calls_only_when_the_caller_has_a_timeout() -> None:
    longest = RecentLongest()
    assert may_run_here(None, longest, 0.0)  # no timeout: always
    assert not may_run_here(10.0, longest, 0.0)  # no history: the first call goes to the replica
    longest.observe(1.0, 0.0)
    assert may_run_here(10.0, longest, 1.0) and not may_run_here(9.9, longest, 1.0)  # MARGIN times


def test_a_caller_with_a_timeout_runs_calls_only_of_a_backend_whose_calls_were_short(
    make_serve: Callable[..., Serve],
) -> None:
    clock = FakeClock()
    srv = make_serve(executor="thread", clock=clock)

    def backend(request: Any = None, seconds: float = 0.0) -> str:
        clock.advance(seconds)  # the call "takes" that long on the instance's clock
        return _thread_name()

    _deploy(srv, backend)
    me = threading.current_thread().name

    def call(seconds: float = 0.0) -> str:
        return str(srv.enqueue("f", kwargs={"seconds": seconds}, caller_runs=True, caller_timeout_s=10).result(WAIT))

    assert call().startswith(REPLICA_THREAD)  # no history yet: on the replica's thread
    assert call(0.5) == me  # its last call took 0 s: this one runs here, and takes 0.5 s
    assert call(2.0) == me  # 0.5 s x MARGIN fits in 10 s: here again, taking 2 s
    assert call().startswith(REPLICA_THREAD)  # 2 s x MARGIN does not fit: the replica's thread
    clock.advance(RECENT_S * 2)  # nothing recent any more
    assert call().startswith(REPLICA_THREAD)
    assert call() == me


def test_a_stream_a_caller_ran_is_pulled_in_its_readers_thread_and_holds_the_replica(
    make_serve: Callable[..., Serve],
) -> None:
    srv = make_serve(executor="thread")

    def numbers(request: Any = None, n: int = 3) -> Any:
        for i in range(n):
            yield (i, _thread_name())

    _deploy(srv, numbers)
    stream = srv.enqueue("f", kwargs={"n": 3}, stream=True, caller_runs=True).result(0)
    behind = srv.enqueue("f", kwargs={"n": 1}, stream=True, caller_runs=True)
    assert not behind.done()  # the replica is taken until the first stream ends
    items: list[Any] = []
    while chunk := stream.read(WAIT):
        items += chunk
    me = threading.current_thread().name
    assert items == [(0, me), (1, me), (2, me)]
    second = behind.result(WAIT)
    assert [item for chunk in iter(lambda: second.read(WAIT), []) for item in chunk][0][1].startswith(REPLICA_THREAD)


def test_the_next_call_goes_to_the_thread_replica_that_finished_last(make_serve: Callable[..., Serve]) -> None:
    """In-process replicas: the one freed last takes the next call (no wake-up of a sleeping thread)."""
    srv = make_serve(executor="thread")
    _deploy(srv, _thread_name, num_replicas=3)
    remote = srv.get_handle("f").remote
    names = [remote().result(WAIT) for _ in range(6)]
    assert len(set(names)) == 1 and names[0].startswith(REPLICA_THREAD)


def test_replicas_in_other_places_take_calls_in_turn(make_serve: Callable[..., Serve]) -> None:
    executor = ScriptedExecutor()
    srv = make_serve(executor=executor)
    _deploy(srv, _thread_name, num_replicas=3)
    remote = srv.get_handle("f").remote
    holders = []
    for _ in range(6):
        future = remote()
        (holder,) = executor.held()
        holders.append(executor.started.index(holder))
        holder.complete()
        future.result(WAIT)
    assert holders == [0, 1, 2, 0, 1, 2]


def test_a_call_run_by_its_caller_can_call_its_own_endpoint(make_serve: Callable[..., Serve]) -> None:
    """The user's code runs outside the dispatch loop that started it: its own calls are not held up."""
    srv = make_serve(executor="thread")

    def backend(request: Any = None, depth: int = 0) -> str:
        if depth == 0:
            return str(srv.get_handle("f").remote(depth=1).result(WAIT))
        return _thread_name()

    _deploy(srv, backend, num_replicas=2)
    assert srv.enqueue("f", caller_runs=True).result(0).startswith(REPLICA_THREAD)  # the inner one, on a replica


class _InProcessScripted(ScriptedExecutor):
    """Scripted replicas that say their calls run in this process (``Replica.in_process``)."""

    def start_replica(self, spec: ReplicaSpec) -> Any:
        replica = super().start_replica(spec)
        replica.in_process = True  # type: ignore[attr-defined]
        return replica


def test_a_replica_still_holding_calls_is_not_preferred_to_an_idle_one(make_serve: Callable[..., Serve]) -> None:
    """max_concurrent_queries > 1: the next call goes to a replica holding nothing, not behind a held call."""
    executor = _InProcessScripted()
    srv = make_serve(executor=executor)
    _deploy(srv, _thread_name, num_replicas=2, max_concurrent_queries=2)
    a, b = executor.started
    remote = srv.get_handle("f").remote
    calls = [remote() for _ in range(3)]  # a, b, a in turn: a holds two, b one
    assert (len(a.held), len(b.held)) == (2, 1)
    b.complete()  # b holds nothing now
    a.complete()  # a freed one of two and still holds one: not next in line
    calls.append(remote())
    assert (len(a.held), len(b.held)) == (1, 1)
    while executor.held():
        executor.held()[0].complete()
    assert all(future.result(WAIT) for future in calls)

"""The scheduler: deadlines enforced while queries wait, batch waits, graceful drain, and two old hangs."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest

import serve_core as serve
from serve_core import BackendConfig, Serve
from serve_core.batching import DEADLINE_LEAD_S
from serve_core.errors import (
    DeadlineExceededError,
    NotFoundError,
    ReplicaDiedError,
    ServeStateError,
    ServeTypeError,
    ShuttingDownError,
    ValidationError,
)
from serve_core.executors.base import Call, ReplicaSpec
from serve_core.executors.thread import ThreadReplica
from serve_core.testing import FakeClock

from .conftest import WAIT
from .procs import wait_until
from .scripted import ScriptedExecutor

MakeServe = Callable[..., Serve]


def _scripted(make_serve: MakeServe, **kwargs: Any) -> tuple[Serve, ScriptedExecutor, FakeClock]:
    executor, clock = ScriptedExecutor(), FakeClock()
    return make_serve(executor=executor, clock=clock, **kwargs), executor, clock


def _backend(srv: Serve, target: Any = None, config: BackendConfig | None = None, endpoint: str = "ep") -> None:
    srv.create_endpoint(endpoint)
    srv.create_backend(target or (lambda *, i=0: i), "b", backend_config=config)
    srv.link(endpoint, "b")


# ------------------------------------------------------------------ deadlines
def test_drop_expired_fails_a_queued_query_at_its_deadline_on_the_fake_clock(make_serve: MakeServe) -> None:
    srv, executor, clock = _scripted(make_serve)
    _backend(srv, config=BackendConfig(drop_expired=True))
    handle = srv.get_handle("ep")
    busy = handle.remote(i=1)  # held by the only replica
    late = handle.options(relative_slo_ms=50).remote(i=2)
    clock.advance(0.049)
    assert not late.done()
    clock.advance(0.001)
    assert isinstance(late.exception(0), DeadlineExceededError)  # the replica is still busy
    (replica,) = executor.held()
    replica.complete()
    assert busy.result(0) == 1
    assert not executor.held()  # the expired query never ran


def test_drop_expired_fails_at_the_deadline_behind_a_busy_replica(make_serve: MakeServe) -> None:
    gate = threading.Event()
    srv = make_serve(executor="thread")
    _backend(srv, lambda *, i=0: gate.wait(WAIT) and i, BackendConfig(drop_expired=True))
    handle = srv.get_handle("ep")
    busy = handle.remote(i=1)
    late = handle.options(relative_slo_ms=50).remote(i=2)
    assert isinstance(late.exception(WAIT), DeadlineExceededError)
    assert not busy.done()  # answered while the replica was still busy, not when it freed up
    gate.set()
    assert busy.result(WAIT) == 1


def test_waiting_room_expires_on_the_fake_clock_without_a_timer_thread(make_serve: MakeServe) -> None:
    clock = FakeClock()
    srv = make_serve(executor="inline", clock=clock, pending_timeout_s=30.0)
    before = set(threading.enumerate())
    future = srv.get_handle("nowhere", missing_ok=True).remote()
    short = srv.get_handle("nowhere", missing_ok=True, relative_slo_ms=100).remote()
    assert set(threading.enumerate()) == before  # no timer thread was started for the waits
    clock.advance(0.1)
    assert isinstance(short.exception(0), DeadlineExceededError)
    assert not future.done()
    clock.advance(29.9)
    assert isinstance(future.exception(0), DeadlineExceededError)
    assert srv.stat()["endpoint_nowhere_pending_size"] == 0


# ---------------------------------------------------------------- two hangs
def test_link_to_a_broken_backend_answers_the_waiting_queries(make_serve: MakeServe) -> None:
    srv, executor, clock = _scripted(make_serve)
    _backend(srv)
    handle = srv.get_handle("ep")
    first = handle.remote(i=1)
    executor.failing_starts = 1  # the replacement of the crashed replica fails: the backend is broken
    (replica,) = executor.held()
    replica.crash()
    assert isinstance(first.exception(WAIT), ReplicaDiedError)
    wait_until(lambda: not executor.failing_starts and srv.stat()["backend_b_num_replicas"] == 0, WAIT)
    waiting = [srv.get_handle("later", missing_ok=True).remote(i=n) for n in range(3)]
    srv.create_endpoint("later")
    srv.link("later", "b")
    for future in waiting:
        assert isinstance(future.exception(WAIT), ReplicaDiedError)
    srv.shutdown()
    assert all(future.done() for future in waiting)


def test_thread_submit_racing_stop_is_answered() -> None:
    """A submit that passed the stopping check before stop() ran still gets an answer.

    The submitting thread is held inside the queue's ``put``; stop() runs meanwhile. With
    the old code stop() finished and failed the leftovers before the put landed, leaving
    the call unanswered; now stop() waits for the submit to finish.
    """
    replica = ThreadReplica(ReplicaSpec("b", "b#1", lambda: "ok", (), BackendConfig()))
    in_put, go = threading.Event(), threading.Event()
    real_queue = replica._work

    class HeldQueue:
        def put(self, item: Any) -> None:
            if item is not None and not in_put.is_set():
                in_put.set()
                go.wait(WAIT)
            real_queue.put(item)

        def __getattr__(self, name: str) -> Any:
            return getattr(real_queue, name)

    replica._work = HeldQueue()  # type: ignore[assignment]
    futures: list[Future[Any]] = []
    submitter = threading.Thread(
        target=lambda: futures.append(replica.submit(Call("__call__", False, False, (None,), ({},))))
    )
    submitter.start()
    assert in_put.wait(WAIT)
    stopper = threading.Thread(target=replica.stop, args=(WAIT,))
    stopper.start()
    stopper.join(0.2)  # gives the old code time to finish stop() first; the new one blocks here
    go.set()
    submitter.join(WAIT)
    stopper.join(WAIT)
    (future,) = futures
    assert future.result(WAIT)[0].value == "ok"


# ------------------------------------------------------------------ batching
@serve.accept_batch
def _sizes(requests: Any, *, i: list[int]) -> list[int]:
    return [len(i)] * len(i)


def _batched(make_serve: MakeServe, wait_s: float, target: Any = _sizes) -> tuple[Serve, FakeClock]:
    clock = FakeClock()
    srv = make_serve(executor="inline", clock=clock)
    _backend(srv, target, BackendConfig(max_batch_size=8, batch_wait_timeout_s=wait_s))
    return srv, clock


def test_a_batch_waits_to_fill(make_serve: MakeServe) -> None:
    srv, clock = _batched(make_serve, 0.2)
    handle = srv.get_handle("ep")
    futures = []
    for n in range(4):
        futures.append(handle.remote(i=n))
        clock.advance(0.01)
    assert not any(f.done() for f in futures)
    clock.advance(0.159)
    assert not any(f.done() for f in futures)
    clock.advance(0.002)  # the first query has now waited 0.2 s
    assert [f.result(0) for f in futures] == [4, 4, 4, 4]


def test_a_full_batch_leaves_at_once(make_serve: MakeServe) -> None:
    srv, clock = _batched(make_serve, 10.0)
    handle = srv.get_handle("ep")
    futures = [handle.remote(i=n) for n in range(8)]
    assert [f.result(0) for f in futures] == [8] * 8


def test_a_waiting_batch_leaves_by_its_tightest_deadline(make_serve: MakeServe) -> None:
    starts: list[float] = []
    clock = FakeClock()

    @serve.accept_batch
    def timed(requests: Any, *, i: list[int]) -> list[float]:
        starts.append(clock.monotonic())
        clock.advance(0.05)  # every batch takes 50 ms
        return [clock.monotonic()] * len(i)

    srv = make_serve(executor="inline", clock=clock)
    _backend(srv, timed, BackendConfig(max_batch_size=8, batch_wait_timeout_s=1.0))
    handle = srv.get_handle("ep")
    # Nothing learned yet: the batch leaves by the deadline at the latest.
    sent = clock.monotonic()
    first = handle.options(relative_slo_ms=200).remote(i=0)
    clock.advance(0.3)
    assert starts == [pytest.approx(sent + 0.2 - DEADLINE_LEAD_S, abs=1e-9)]
    first.result(0)
    # 50 ms per batch learned: the next one starts early enough to finish by its deadline.
    sent = clock.monotonic()
    second = handle.options(relative_slo_ms=200).remote(i=1)
    clock.advance(0.3)
    assert starts[1] == pytest.approx(sent + 0.15 - DEADLINE_LEAD_S, abs=1e-9)
    assert second.result(0) <= sent + 0.2 + 1e-9


# --------------------------------------------------------------------- drain
def test_shutdown_serves_what_is_queued_and_refuses_new_calls(make_serve: MakeServe) -> None:
    gate = threading.Event()
    srv = make_serve(executor="thread")
    _backend(srv, lambda *, i=0: gate.wait(WAIT) and i)
    handle = srv.get_handle("ep")
    futures = [handle.remote(i=n) for n in range(4)]
    stopper = threading.Thread(target=srv.shutdown)
    stopper.start()
    wait_until(lambda: not srv.running, WAIT)
    with pytest.raises(ShuttingDownError):
        handle.remote(i=9)
    assert ShuttingDownError("x").status_code == 503
    assert not any(f.done() for f in futures)
    gate.set()
    assert [f.result(WAIT) for f in futures] == [0, 1, 2, 3]
    stopper.join(WAIT)
    assert not stopper.is_alive()
    with pytest.raises(ServeStateError):
        handle.remote(i=9)


def test_shutdown_fails_what_outlives_the_drain_time(make_serve: MakeServe) -> None:
    srv, executor, clock = _scripted(make_serve, drain_timeout_s=30.0)
    _backend(srv)
    handle = srv.get_handle("ep")
    running, queued = handle.remote(i=1), handle.remote(i=2)
    stopper = threading.Thread(target=srv.shutdown)
    stopper.start()
    wait_until(lambda: not srv.running and clock.pending > 0, WAIT)  # the drain's timer is armed
    clock.advance(30.0)
    stopper.join(WAIT)
    assert not stopper.is_alive()
    for future in (running, queued):
        assert isinstance(future.exception(0), ShuttingDownError)


# ---------------------------------------------------------------- capacity
def test_a_lowered_max_concurrent_queries_applies_once_calls_drain(make_serve: MakeServe) -> None:
    srv, executor, clock = _scripted(make_serve)
    _backend(srv, config=BackendConfig(max_concurrent_queries=4))
    handle = srv.get_handle("ep")
    futures = [handle.remote(i=n) for n in range(6)]
    (replica,) = executor.started
    assert len(replica.held) == 4  # the config's number, not the replica's default of 1
    config = srv.get_backend_config("b")
    config.max_concurrent_queries = 1
    srv.set_backend_config("b", config)
    for held in (3, 2, 1):  # still at or above the new capacity: nothing new is handed over
        replica.complete()
        assert (len(replica.held), srv.stat()["backend_b_queue_size"]) == (held, 2)
    replica.complete()  # none in flight: room for exactly one call again
    assert (len(replica.held), srv.stat()["backend_b_queue_size"]) == (1, 1)
    replica.complete()
    replica.complete()
    assert [f.result(0) for f in futures] == list(range(6))


@pytest.mark.parametrize("seconds", [-1, float("inf"), "30", True])
def test_drain_timeout_is_validated(seconds: Any) -> None:
    with pytest.raises(ValidationError, match="drain_timeout_s"):
        Serve(start_server=False, drain_timeout_s=seconds)


def test_during_the_drain_health_is_503_and_a_second_shutdown_waits_for_the_first(make_serve: MakeServe) -> None:
    from werkzeug.test import Client

    gate = threading.Event()
    srv = make_serve(executor="thread")
    _backend(srv, lambda *, i=0: gate.wait(WAIT) and i)
    client = Client(srv.wsgi_app())
    assert client.get("/-/healthz").status_code == 200
    held = srv.get_handle("ep").remote(i=1)
    first = threading.Thread(target=srv.shutdown)
    first.start()
    wait_until(lambda: srv.state == "draining", WAIT)
    health = client.get("/-/healthz")
    assert (health.status_code, health.text) == (503, "draining\n")
    second_done = threading.Event()

    def second_shutdown() -> None:
        srv.shutdown()
        second_done.set()

    second = threading.Thread(target=second_shutdown)
    second.start()
    assert not second_done.wait(0.2)  # still draining: the second call waits for the first
    gate.set()
    assert held.result(WAIT) == 1
    first.join(WAIT)
    second.join(WAIT)
    assert second_done.is_set() and srv.state == "stopped"


def test_module_api_during_the_drain(make_serve: MakeServe) -> None:
    gate = threading.Event()
    srv = serve.init(executor="thread", start_server=False)
    _backend(srv, lambda *, i=0: gate.wait(WAIT) and i)
    held = serve.get_handle("ep").remote(i=1)
    stopper = threading.Thread(target=serve.shutdown)
    stopper.start()
    wait_until(lambda: srv.state == "draining", WAIT)
    with pytest.raises(ShuttingDownError):
        serve.get_handle("ep")
    with pytest.raises(ShuttingDownError):
        serve.init(start_server=False)  # not a second instance while the first still drains
    gate.set()
    assert held.result(WAIT) == 1
    stopper.join(WAIT)
    with pytest.raises(ServeStateError, match="not initialised"):
        serve.get_handle("ep")


class _IncompleteReplica:
    """Lacks ``default_max_concurrent_queries``: not a Replica."""

    def __init__(self, spec: ReplicaSpec) -> None:
        self.replica_id = spec.replica_id
        self.alive = True
        self.stopped = False

    def submit(self, call: Call) -> Future[Any]:
        raise AssertionError("never called")

    def stop(self, drain_timeout: float | None = None) -> None:
        self.stopped = True


class _IncompleteExecutor:
    name = "incomplete"
    places_replicas = False

    def __init__(self) -> None:
        self.started: list[_IncompleteReplica] = []

    def start_replica(self, spec: ReplicaSpec) -> _IncompleteReplica:
        self.started.append(_IncompleteReplica(spec))
        return self.started[-1]

    def shutdown(self) -> None:
        pass


def test_a_replica_missing_protocol_members_is_refused_and_stopped(make_serve: MakeServe) -> None:
    executor = _IncompleteExecutor()
    srv = make_serve(executor=executor)
    with pytest.raises(ServeTypeError, match="default_max_concurrent_queries"):
        srv.create_backend(lambda: 1, "b")
    assert [replica.stopped for replica in executor.started] == [True]
    with pytest.raises(NotFoundError):
        srv.get_backend_config("b")


def test_batch_wait_needs_batching(make_serve: MakeServe) -> None:
    srv = make_serve(executor="inline")
    with pytest.raises(ValidationError, match="batch_wait_timeout_s"):
        srv.create_backend(lambda: 1, "b", backend_config=BackendConfig(batch_wait_timeout_s=0.1))


def test_a_waiting_batch_that_drops_expired_queries_still_runs_by_the_deadline(make_serve: MakeServe) -> None:
    clock = FakeClock()
    srv = make_serve(executor="inline", clock=clock)
    config = BackendConfig(max_batch_size=8, batch_wait_timeout_s=1.0, drop_expired=True)
    _backend(srv, _sizes, config)
    future = srv.get_handle("ep", relative_slo_ms=200).remote(i=0)
    clock.advance(0.2)
    assert future.result(0) == 1  # left just before its deadline instead of expiring at it


def test_a_chain_of_calls_from_done_callbacks_does_not_grow_the_stack(make_serve: MakeServe) -> None:
    """Each answer's done-callback makes the next call, on the inline executor: 3,000 deep, no recursion."""
    srv = make_serve(executor="inline")
    srv.create_endpoint("ep")
    srv.create_backend(lambda *, i=0: i, "b")
    handle = srv.get_handle("ep")
    answers: list[int] = []

    def next_call(future: Future[Any]) -> None:
        answers.append(future.result())
        if len(answers) < 3_000:
            handle.remote(i=len(answers)).add_done_callback(next_call)

    handle.remote(i=0).add_done_callback(next_call)  # waits for traffic: the callback is there first
    srv.link("ep", "b")
    assert answers == list(range(3_000))
    assert handle.remote(i=7).result(0) == 7  # the backend is still serving


def test_a_failed_reconfigure_keeps_the_old_replica_count(make_serve: MakeServe) -> None:
    srv, executor, clock = _scripted(make_serve)
    _backend(srv, config=BackendConfig(num_replicas=3))
    executor.failing_starts = 1
    with pytest.raises(RuntimeError, match="scripted"):
        srv.set_backend_config("b", BackendConfig(num_replicas=1, num_cpus=1))  # placement change, then fewer
    assert srv.get_backend_config("b").num_replicas == 3
    assert len(srv.replica_ids("b")) == 3


def test_a_requeued_query_still_expires_while_its_replica_is_replaced(make_serve: MakeServe) -> None:
    srv, executor, clock = _scripted(make_serve)
    _backend(srv, config=BackendConfig(drop_expired=True))
    (replica,) = executor.started
    replica.stop()  # gone without a call in flight: the next call finds it and is turned away
    executor.start_gate = threading.Event()  # its replacement takes its time
    future = srv.get_handle("ep", relative_slo_ms=50).remote(i=1)
    clock.advance(0.05)
    assert isinstance(future.exception(0), DeadlineExceededError)
    executor.start_gate.set()
    wait_until(lambda: len(srv.replica_ids("b")) == 1, WAIT)

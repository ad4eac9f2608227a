"""Replica deaths through the executor contract, with a crashing executor built on threads."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

from serve_core import BackendConfig, Serve, ServeHandle
from serve_core.errors import NotDeliveredError, ReplicaDiedError, ServeError, ServeStateError
from serve_core.executors.base import Call, Outcome, ReplicaSpec
from serve_core.executors.thread import ThreadReplica

from .conftest import WAIT


class CrashingReplica(ThreadReplica):
    """Dies (future fails with ReplicaDiedError) when a query passes ``crash=True``."""

    def __init__(self, spec: ReplicaSpec, executor: CrashingExecutor) -> None:
        super().__init__(spec)
        self.dead = False
        self.executor = executor

    @property
    def alive(self) -> bool:
        return not self.dead and super().alive

    def submit(self, call: Call) -> Future[list[Outcome]]:
        if any(kwargs.get("crash") for kwargs in call.kwargs):
            self.dead = True
            future: Future[list[Outcome]] = Future()
            future.set_exception(ReplicaDiedError(f"replica {self.replica_id} exited with code -9 (SIGKILL)"))
            return future
        return super().submit(call)


class CrashingExecutor:
    name = "crashing"
    places_replicas = False

    def __init__(self) -> None:
        self.started: list[CrashingReplica] = []
        self.fail_starts = False
        self.replaced = threading.Event()

    def start_replica(self, spec: ReplicaSpec) -> CrashingReplica:
        if self.fail_starts:
            raise RuntimeError("no capacity")
        replica = CrashingReplica(spec, self)
        self.started.append(replica)
        if len(self.started) > 1:
            self.replaced.set()
        return replica

    def shutdown(self) -> None:
        pass


def deploy(srv: Serve) -> None:
    srv.create_endpoint("ep")
    srv.create_backend(lambda *, crash=False, i=0: i, "b", backend_config=BackendConfig(num_replicas=1))
    srv.link("ep", "b")


def test_dead_replica_fails_its_call_and_is_replaced(make_serve) -> None:
    executor = CrashingExecutor()
    srv = make_serve(executor=executor)
    deploy(srv)
    handle = srv.get_handle("ep")
    with pytest.raises(ReplicaDiedError, match="SIGKILL"):
        handle.remote(crash=True).result(WAIT)
    assert executor.replaced.wait(WAIT)
    assert handle.remote(i=5).result(WAIT) == 5
    assert len(executor.started) == 2
    assert srv.stat()["backend_b_num_replicas"] == 1
    assert srv.stat()["b_error_counter"] == 1


def _not_yet_linked(make_serve) -> tuple[CrashingExecutor, Serve, ServeHandle]:
    """Endpoint ``ep`` and backend ``b`` on a CrashingExecutor, not linked yet: calls wait."""
    executor = CrashingExecutor()
    srv = make_serve(executor=executor)
    srv.create_endpoint("ep")
    srv.create_backend(lambda *, crash=False, i=0: i, "b")
    return executor, srv, srv.get_handle("ep")


def test_queued_queries_continue_on_the_replacement(make_serve) -> None:
    _, srv, handle = _not_yet_linked(make_serve)
    crash = handle.remote(crash=True, i=0)
    queued = [handle.remote(crash=False, i=n) for n in range(1, 6)]
    srv.link("ep", "b")
    with pytest.raises(ReplicaDiedError):
        crash.result(WAIT)
    assert [f.result(WAIT) for f in queued] == [1, 2, 3, 4, 5]


def test_queued_queries_fail_when_no_replica_can_be_restarted(make_serve) -> None:
    executor, srv, handle = _not_yet_linked(make_serve)
    crash = handle.remote(crash=True)
    queued = handle.remote(crash=False)
    executor.fail_starts = True
    srv.link("ep", "b")
    with pytest.raises(ReplicaDiedError):
        crash.result(WAIT)
    with pytest.raises(ReplicaDiedError, match="no replica left"):
        queued.result(WAIT)


class ShortAnsweringExecutor(CrashingExecutor):
    """An executor bug: its replicas answer one query fewer than they were given."""

    def start_replica(self, spec: ReplicaSpec) -> CrashingReplica:
        replica = super().start_replica(spec)
        submit = replica.submit

        def short_submit(call: Call) -> Future[list[Outcome]]:
            answered: Future[list[Outcome]] = Future()
            submit(call).add_done_callback(lambda f: answered.set_result(f.result()[:-1]))
            return answered

        replica.submit = short_submit  # type: ignore[method-assign]
        return replica


def test_missing_outcomes_fail_the_call_instead_of_stranding_it(make_serve) -> None:
    srv = make_serve(executor=ShortAnsweringExecutor())
    deploy(srv)
    with pytest.raises(ServeError, match="answered 0 of 1"):
        srv.get_handle("ep").remote(i=1).result(WAIT)


def test_backend_without_replicas_fails_fast_until_restarted(make_serve) -> None:
    executor = CrashingExecutor()
    srv = make_serve(executor=executor)
    deploy(srv)
    handle = srv.get_handle("ep")
    executor.fail_starts = True
    with pytest.raises(ReplicaDiedError):
        handle.remote(crash=True).result(WAIT)
    executor.replaced.clear()
    for _ in range(int(WAIT / 0.01)):  # the failed restart happens on a helper thread
        try:
            handle.remote(i=1)
        except ReplicaDiedError as exc:
            assert "set_backend_config" in str(exc)
            break
        threading.Event().wait(0.01)
    else:
        pytest.fail("the backend never reported that it has no replica")
    executor.fail_starts = False
    srv.set_backend_config("b", srv.get_backend_config("b"))  # starts the missing replica
    assert handle.remote(i=2).result(WAIT) == 2


def test_replica_found_dead_before_the_call_costs_no_query(make_serve) -> None:
    executor = CrashingExecutor()
    srv = make_serve(executor=executor)
    deploy(srv)
    executor.started[0].dead = True  # died while idle: the router notices when it hands out work
    assert srv.get_handle("ep").remote(i=3).result(WAIT) == 3
    assert len(executor.started) == 2
    assert srv.stat()["b_error_counter"] == 0


class HoldingReplica:
    """Holds every call unanswered until :meth:`die` fails them all, as a dead actor would."""

    default_max_concurrent_queries = 1

    def __init__(self, spec: ReplicaSpec) -> None:
        self.replica_id = spec.replica_id
        self.held: list[Future[list[Outcome]]] = []
        self.stops = 0
        self.dead = False

    @property
    def alive(self) -> bool:
        return not self.dead

    def submit(self, call: Call) -> Future[list[Outcome]]:
        future: Future[list[Outcome]] = Future()
        self.held.append(future)
        return future

    def die(self) -> None:
        self.dead = True
        for future in self.held:
            future.set_exception(ReplicaDiedError(f"replica {self.replica_id} died"))

    def stop(self, drain_timeout: float | None = None) -> None:
        self.stops += 1
        self.dead = True


class HoldingExecutor:
    name = "holding"
    places_replicas = False

    def __init__(self) -> None:
        self.started: list[HoldingReplica] = []

    def start_replica(self, spec: ReplicaSpec) -> HoldingReplica:
        self.started.append(HoldingReplica(spec))
        return self.started[-1]

    def shutdown(self) -> None:
        pass


def test_replica_dying_with_several_calls_is_replaced_once(make_serve) -> None:
    executor = HoldingExecutor()
    srv = make_serve(executor=executor)
    srv.create_endpoint("ep")
    srv.create_backend(lambda: None, "b", backend_config=BackendConfig(max_concurrent_queries=3))
    srv.link("ep", "b")
    handle = srv.get_handle("ep")
    futures = [handle.remote() for _ in range(3)]
    (victim,) = executor.started
    assert len(victim.held) == 3
    victim.die()
    for future in futures:
        with pytest.raises(ReplicaDiedError):
            future.result(WAIT)
    srv.shutdown()  # waits for the replacement under way
    assert len(executor.started) == 2
    assert victim.stops == 1  # one replacement, not one per failed call


class TurningAwayExecutor(CrashingExecutor):
    """Its first ``count`` replicas turn every call away with NotDeliveredError, as a stopped one does."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count

    def start_replica(self, spec: ReplicaSpec) -> CrashingReplica:
        replica = super().start_replica(spec)
        if len(self.started) <= self.count:

            def turn_away(call: Call) -> Future[list[Outcome]]:
                future: Future[list[Outcome]] = Future()
                future.set_exception(NotDeliveredError(f"replica {replica.replica_id} turns calls away"))
                return future

            replica.submit = turn_away  # type: ignore[method-assign]
        return replica


def test_a_call_that_never_reached_its_replica_runs_on_another(make_serve) -> None:
    executor = TurningAwayExecutor(count=1)
    srv = make_serve(executor=executor)
    deploy(srv)
    assert srv.get_handle("ep").remote(i=4).result(WAIT) == 4  # on the replacement
    assert len(executor.started) == 2
    assert srv.stat()["b_error_counter"] == 0


def test_a_query_turned_away_again_and_again_fails_instead_of_bouncing_forever(make_serve) -> None:
    srv = make_serve(executor=TurningAwayExecutor(count=1_000))
    srv.create_endpoint("ep")
    srv.create_backend(lambda: None, "b")
    srv.link("ep", "b")
    with pytest.raises(ReplicaDiedError, match="after 3 attempts"):
        srv.get_handle("ep").remote().result(WAIT)


def test_calls_beside_a_turned_away_one_are_still_answered_at_shutdown(make_serve) -> None:
    executor = HoldingExecutor()
    srv = make_serve(executor=executor, drain_timeout_s=0.01)
    srv.create_endpoint("ep")
    srv.create_backend(lambda: None, "b", backend_config=BackendConfig(max_concurrent_queries=2))
    srv.link("ep", "b")
    handle = srv.get_handle("ep")
    turned_away, held = handle.remote(), handle.remote()
    (first,) = executor.started
    first.held[0].set_exception(NotDeliveredError("turned away"))  # requeued to a replacement
    srv.shutdown()  # the held call never ends: shutdown must still answer it (and the requeued one)
    for future in (turned_away, held):
        with pytest.raises(ServeStateError):
            future.result(WAIT)

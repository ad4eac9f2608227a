"""Queues, deadlines, batching, replicas, back-pressure and shutdown, on every executor.

Many tests queue queries on an endpoint before it has traffic, then link it: the
router then moves them into the backend queue in one step, which makes the order
of execution deterministic without sleeping.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import wait

import pytest

import serve_core as serve
from serve_core import BackendConfig, Serve
from serve_core.errors import (
    BackPressureError,
    BatchResultError,
    DeadlineExceededError,
    ServeStateError,
)

from .conftest import WAIT


class Counter:
    """Returns how many calls this replica ran before the current one."""

    def __init__(self) -> None:
        self.count = 0
        self.replica = uuid.uuid4().hex

    def __call__(self, *, i=None):
        self.count += 1
        return (self.count - 1, self.replica, i)


def queued(srv: Serve, target: object, config: BackendConfig, calls: list[dict]) -> list:
    """Create backend 'b' and endpoint 'ep', queue ``calls``, then link; return the futures."""
    srv.create_endpoint("ep")
    srv.create_backend(target, "b", backend_config=config)
    handle = srv.get_handle("ep")
    futures = [handle.options(**opts.pop("options", {})).remote(**opts) for opts in calls]
    srv.link("ep", "b")
    return futures


def results(futures: list) -> list:
    return [f.result(WAIT) for f in futures]


def test_earliest_deadline_runs_first(srv: Serve) -> None:
    slos = [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100]
    calls = [{"i": slo, "options": {"relative_slo_ms": slo}} for slo in slos]
    ran = results(queued(srv, Counter, BackendConfig(), calls))
    order = [i for _, _, i in sorted(ran)]
    assert order == list(reversed(slos))


def test_batches_form_from_what_is_queued(srv: Serve) -> None:
    @serve.accept_batch
    def batched(requests, *, i):
        assert len(requests) == len(i)
        return [(serve.context.batch_size, len(i), value) for value in i]

    futures = queued(srv, batched, BackendConfig(max_batch_size=5), [{"i": n} for n in range(20)])
    answers = results(futures)
    assert [value for _, _, value in answers] == list(range(20))
    assert all(size == length for size, length, _ in answers)
    assert max(size for size, _, _ in answers) == 5


def test_batches_group_methods(srv: Serve) -> None:
    class Methods:
        @serve.accept_batch
        def __call__(self, *, i):
            return list(i)

        @serve.accept_batch
        def a(self, *, i):
            return [f"a-{n}" for n in range(len(i))]

        @serve.accept_batch
        def b(self, *, i):
            return [f"b-{n}" for n in range(len(i))]

    calls = [{"i": 0, "options": {"method_name": m}} for m in ("a", "b", "a", "b")]
    answers = results(queued(srv, Methods, BackendConfig(max_batch_size=2), calls))
    assert sorted(answers) == ["a-0", "a-1", "b-0", "b-1"]


@pytest.mark.parametrize("bad", [lambda i: i[:-1], lambda i: "not a list"], ids=["short", "not-list"])
def test_wrong_batch_result_fails_every_query_of_the_batch(srv: Serve, bad) -> None:
    def make():
        @serve.accept_batch
        def backend(*, i):
            return bad(list(i))

        return backend

    futures = queued(srv, make(), BackendConfig(max_batch_size=3), [{"i": n} for n in range(3)])
    for future in futures:
        with pytest.raises(BatchResultError, match="list of 3"):
            future.result(WAIT)
    assert srv.stat()["b_error_counter"] == 3


def test_batch_user_error_reaches_every_caller(srv: Serve) -> None:
    @serve.accept_batch
    def backend(*, i):
        raise ValueError("batch failed")

    futures = queued(srv, backend, BackendConfig(max_batch_size=4), [{"i": n} for n in range(4)])
    for future in futures:
        with pytest.raises(ValueError, match="batch failed"):
            future.result(WAIT)


def test_two_replicas_both_serve(srv: Serve) -> None:
    answers = results(queued(srv, Counter, BackendConfig(num_replicas=2), [{"i": n} for n in range(20)]))
    assert len({replica for _, replica, _ in answers}) == 2
    assert srv.stat()["backend_b_num_replicas"] == 2


def test_scaling_up_and_down_keeps_answering(srv: Serve) -> None:
    srv.create_endpoint("ep")
    srv.create_backend(Counter, "b")
    srv.link("ep", "b")
    handle = srv.get_handle("ep")
    for replicas in (3, 1, 2):
        config = srv.get_backend_config("b")
        config.num_replicas = replicas
        srv.set_backend_config("b", config)
        assert srv.stat()["backend_b_num_replicas"] == replicas
        assert len(results([handle.remote(i=n) for n in range(10)])) == 10


def test_full_queue_rejects_at_once(srv: Serve) -> None:
    futures = queued(srv, Counter, BackendConfig(max_queue_size=2), [{"i": n} for n in range(5)])
    done = [f.exception(WAIT) for f in futures]
    assert [type(e) for e in done].count(BackPressureError) == 3
    assert done.count(None) == 2


def linked(srv: Serve, target: object, config: BackendConfig) -> serve.ServeHandle:
    srv.create_endpoint("ep")
    srv.create_backend(target, "b", backend_config=config)
    srv.link("ep", "b")
    return srv.get_handle("ep")


def test_expired_queries_fail_fast_when_configured(srv: Serve) -> None:
    handle = linked(srv, Counter, BackendConfig(drop_expired=True))
    past = handle.options(absolute_slo_ms=(time.time() - 10) * 1000)
    with pytest.raises(DeadlineExceededError, match="deadline"):
        past.remote(i=1).result(WAIT)
    assert handle.remote(i=2).result(WAIT)[2] == 2
    assert srv.stat()["b_request_counter"] == 1  # the expired query never ran


def test_expired_queries_still_run_by_default(srv: Serve) -> None:
    handle = linked(srv, Counter, BackendConfig())
    past = handle.options(absolute_slo_ms=(time.time() - 10) * 1000)
    assert past.remote(i=1).result(WAIT)[2] == 1


def test_deadline_bounds_the_wait_for_traffic(srv: Serve) -> None:
    srv.create_endpoint("ep")
    soon = srv.get_handle("ep", relative_slo_ms=1)
    with pytest.raises(DeadlineExceededError, match="no traffic"):
        soon.remote().result(WAIT)


def test_missing_ok_handle_waits_for_traffic(srv: Serve) -> None:
    handle = srv.get_handle("later", missing_ok=True)
    future = handle.remote(i=7)
    assert not future.done()
    srv.create_endpoint("later")
    srv.create_backend(Counter, "b")
    srv.link("later", "b")
    assert future.result(WAIT)[2] == 7


def test_waiting_for_traffic_is_bounded(make_serve, executor: str) -> None:
    srv = make_serve(executor=executor, max_pending_per_endpoint=2, pending_timeout_s=0.05)
    handle = srv.get_handle("nowhere", missing_ok=True)
    first = handle.remote()
    handle.remote()
    with pytest.raises(BackPressureError, match="no traffic"):
        handle.remote()
    with pytest.raises(DeadlineExceededError, match="no traffic"):
        first.result(WAIT)


def test_shutdown_resolves_queued_queries(make_serve, executor: str) -> None:
    srv = make_serve(executor=executor)
    srv.create_endpoint("ep")
    future = srv.get_handle("ep").remote()
    srv.shutdown()
    with pytest.raises(ServeStateError):
        future.result(WAIT)
    with pytest.raises(ServeStateError):
        srv.get_handle("ep")
    with pytest.raises(ServeStateError):
        srv.create_endpoint("other")
    srv.shutdown()  # idempotent


def _split_half_and_half(srv: Serve) -> serve.ServeHandle:
    """Endpoint ``ep`` split evenly between backends answering "a" and "b"."""
    srv.create_endpoint("ep")
    srv.create_backend(lambda: "a", "a")
    srv.create_backend(lambda: "b", "b")
    srv.split("ep", {"a": 0.5, "b": 0.5})
    return srv.get_handle("ep")


def test_split_serves_both_backends(srv: Serve) -> None:
    handle = _split_half_and_half(srv)
    answers = results([handle.remote() for _ in range(200)])
    assert 50 < answers.count("a") < 150
    assert srv.stat()["endpoint_ep_request_counter"] == 200


def test_shard_key_sticks_to_one_backend(srv: Serve) -> None:
    handle = _split_half_and_half(srv)
    for user in ("alice", "bob", "carol"):
        sticky = handle.options(shard_key=user)
        assert len(set(results([sticky.remote() for _ in range(20)]))) == 1


# ---- tests that need a replica held busy: concurrent executors only ----------------


def blocking_backend(gate):
    def backend(*, i=None):
        if not gate.wait(WAIT):
            raise TimeoutError("gate never opened")
        return i

    return backend


def test_full_queue_makes_remote_raise_immediately(csrv: Serve, make_gate) -> None:
    gate = make_gate()
    csrv.create_endpoint("ep")
    config = BackendConfig(max_queue_size=2, max_concurrent_queries=1)
    csrv.create_backend(blocking_backend(gate), "b", backend_config=config)
    csrv.link("ep", "b")
    handle = csrv.get_handle("ep")
    futures = [handle.remote(i=0)]  # in flight
    futures += [handle.remote(i=1), handle.remote(i=2)]  # queued
    with pytest.raises(BackPressureError):
        handle.remote(i=3)
    gate.set()
    assert results(futures) == [0, 1, 2]


def test_scale_down_drains_calls_in_flight(csrv: Serve, make_gate) -> None:
    gate = make_gate()
    csrv.create_endpoint("ep")
    csrv.create_backend(blocking_backend(gate), "b", backend_config=BackendConfig(num_replicas=2))
    csrv.link("ep", "b")
    handle = csrv.get_handle("ep")
    futures = [handle.remote(i=n) for n in range(4)]
    scaler = threading.Thread(target=csrv.set_backend_config, args=("b", BackendConfig(num_replicas=1)))
    scaler.start()
    scaler.join(0.2)
    assert scaler.is_alive(), "scale-down returned while the removed replica was still busy"
    gate.set()
    scaler.join(WAIT)
    assert not scaler.is_alive()
    assert results(futures) == [0, 1, 2, 3]
    assert csrv.stat()["backend_b_num_replicas"] == 1


def test_traffic_change_does_not_strand_queued_queries(csrv: Serve, make_gate) -> None:
    gate = make_gate()
    csrv.create_endpoint("ep")
    csrv.create_backend(blocking_backend(gate), "old")
    csrv.create_backend(lambda *, i=None: "new", "new")
    csrv.link("ep", "old")
    handle = csrv.get_handle("ep")
    stuck = [handle.remote(i=n) for n in range(5)]
    csrv.link("ep", "new")
    assert handle.remote().result(WAIT) == "new"
    gate.set()
    assert results(stuck) == [0, 1, 2, 3, 4]


def test_many_concurrent_callers_lose_nothing(csrv: Serve) -> None:
    csrv.create_endpoint("ep")
    csrv.create_backend(lambda *, i: i, "b", backend_config=BackendConfig(num_replicas=2))
    csrv.link("ep", "b")
    handle = csrv.get_handle("ep")
    futures: list = []
    lock = threading.Lock()

    def caller(start: int) -> None:
        mine = [handle.remote(i=start + n) for n in range(100)]
        with lock:
            futures.extend(mine)

    threads = [threading.Thread(target=caller, args=(k * 100,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    done, not_done = wait(futures, WAIT)
    assert not not_done
    assert sorted(f.result() for f in done) == list(range(800))


def test_failed_scale_up_keeps_the_old_config(make_serve) -> None:
    srv = make_serve(executor="thread")

    class FailsAfterFirst:
        built = 0

        def __init__(self) -> None:
            type(self).built += 1
            if type(self).built > 1:
                raise RuntimeError("out of memory")

        def __call__(self):
            return "ok"

    srv.create_endpoint("ep")
    srv.create_backend(FailsAfterFirst, "b")
    srv.link("ep", "b")
    with pytest.raises(RuntimeError, match="out of memory"):
        srv.set_backend_config("b", BackendConfig(num_replicas=3))
    assert srv.get_backend_config("b").num_replicas == 1
    assert srv.stat()["backend_b_num_replicas"] == 1
    assert srv.get_handle("ep").remote().result(WAIT) == "ok"


def test_shutdown_answers_calls_that_outlive_the_drain_timeout(make_serve) -> None:
    release = threading.Event()
    srv = make_serve(executor="thread", drain_timeout_s=0.05)
    srv.create_endpoint("ep")
    srv.create_backend(lambda: release.wait(WAIT), "b")
    srv.link("ep", "b")
    stuck = srv.get_handle("ep").remote()
    try:
        srv.shutdown()
        with pytest.raises(ServeStateError, match="before the call finished"):
            stuck.result(WAIT)
    finally:
        release.set()  # let the replica thread end


@pytest.mark.parametrize("capacity", [1, 2])
def test_a_replica_holds_up_to_max_concurrent_queries(csrv: Serve, make_gate, capacity: int) -> None:
    gate = make_gate()
    config = BackendConfig(max_concurrent_queries=capacity)
    csrv.create_endpoint("ep")
    csrv.create_backend(blocking_backend(gate), "b", backend_config=config)
    csrv.link("ep", "b")
    handle = csrv.get_handle("ep")
    futures = [handle.remote(i=n) for n in range(3)]
    assert csrv.stat()["backend_b_queue_size"] == 3 - capacity  # the rest went to the replica
    gate.set()
    assert results(futures) == [0, 1, 2]


def test_pipelined_replicas_answer_everything(srv: Serve) -> None:
    config = BackendConfig(num_replicas=2, max_concurrent_queries=4)
    answers = results(queued(srv, Counter, config, [{"i": n} for n in range(40)]))
    assert sorted(i for _, _, i in answers) == list(range(40))
    assert len({replica for _, replica, _ in answers}) == 2


def test_stat_splits_latency_and_counts_batches_and_endpoint_errors(srv: Serve) -> None:
    @serve.accept_batch
    def batched(*, i):
        if 13 in i:
            raise ValueError("unlucky batch")
        return list(i)

    futures = queued(srv, batched, BackendConfig(max_batch_size=5), [{"i": n} for n in range(20)])
    failed = sum(f.exception(WAIT) is not None for f in futures)
    assert failed == 5  # the batch holding 13
    stats = srv.stat(percentiles=[0, 100], agg_windows_seconds=[60])
    assert stats["b_batch_size_100th_perc_60_window"] == 5
    assert stats["b_batch_size_0th_perc_60_window"] == 5
    assert stats["b_error_counter"] == stats["endpoint_ep_error_counter"] == 5
    for part in ("queue_wait_s", "execution_s"):
        assert 0 <= stats[f"b_{part}_100th_perc_60_window"] <= stats["b_latency_s_100th_perc_60_window"]

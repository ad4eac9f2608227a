"""Deadline-ordered queues and batch formation (pure, on a fake clock)."""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_EXCEPTION, Future, InvalidStateError, ThreadPoolExecutor, as_completed, wait

import pytest

from serve_core.batching import DEADLINE_LEAD_S, ExecutionTimes, form_batch
from serve_core.clock import SystemClock
from serve_core.errors import BackPressureError, ValidationError
from serve_core.queues import NO_DEADLINE, BackendQueue, Query, ServeFuture
from serve_core.slo import SLO
from serve_core.testing import FakeClock


def query(deadline: float = NO_DEADLINE, method: str = "__call__", arrival: float = 0.0, **kwargs: object) -> Query:
    return Query("e", method, dict(kwargs), None, deadline, None, ServeFuture(), arrival, backend="b")


def test_earliest_deadline_first_then_arrival() -> None:
    queue = BackendQueue(100)
    items = [query(5.0, i=0), query(NO_DEADLINE, i=1), query(1.0, i=2), query(5.0, i=3), query(NO_DEADLINE, i=4)]
    for item in items:
        queue.push(item)
    assert [queue.pop().kwargs["i"] for _ in range(5)] == [2, 0, 3, 1, 4]


def test_restored_queries_take_back_their_place_with_and_without_deadlines() -> None:
    queue = BackendQueue(100)
    for item in [query(i=0), query(i=1), query(2.0, i=2), query(i=3), query(i=4)]:
        queue.push(item)
    taken = [queue.pop() for _ in range(4)]  # 2 (deadline first), then 0, 1, 3
    assert [q.kwargs["i"] for q in taken] == [2, 0, 1, 3]
    for item in (taken[2], taken[0], taken[3], taken[1]):  # back in any order (a requeue does that)
        queue.restore(item)
    assert len(queue) == 5
    assert [q.kwargs["i"] for q in queue.drain()] == [2, 0, 1, 3, 4]
    assert len(queue) == 0


def test_queue_is_bounded() -> None:
    queue = BackendQueue(2)
    queue.push(query())
    queue.push(query())
    with pytest.raises(BackPressureError, match="full"):
        queue.push(query())
    assert len(queue) == 2


def test_batch_takes_up_to_max_in_deadline_order() -> None:
    queue = BackendQueue(100)
    for i in range(7):
        queue.push(query(float(10 - i), i=i))
    batch = form_batch(queue, 4, now=0.0, drop_expired=False)
    assert [q.kwargs["i"] for q in batch.queries] == [6, 5, 4, 3]
    assert len(queue) == 3


def test_single_mode_takes_one() -> None:
    queue = BackendQueue(100)
    queue.push(query(i=0))
    queue.push(query(i=1))
    assert [q.kwargs["i"] for q in form_batch(queue, None, 0.0, False).queries] == [0]


def test_batch_groups_by_method_and_keeps_the_rest_in_order() -> None:
    queue = BackendQueue(100)
    for i, method in enumerate(["a", "b", "a", "b", "a"]):
        queue.push(query(method=method, i=i))
    first = form_batch(queue, 10, 0.0, False)
    assert [(q.method, q.kwargs["i"]) for q in first.queries] == [("a", 0), ("a", 2), ("a", 4)]
    second = form_batch(queue, 10, 0.0, False)
    assert [(q.method, q.kwargs["i"]) for q in second.queries] == [("b", 1), ("b", 3)]


def test_batch_groups_by_keyword_names() -> None:
    queue = BackendQueue(100)
    queue.push(query(x=1))
    queue.push(query(y=2))
    queue.push(query(x=3))
    assert [q.kwargs for q in form_batch(queue, 10, 0.0, False).queries] == [{"x": 1}, {"x": 3}]


def test_held_back_queries_keep_their_place() -> None:
    queue = BackendQueue(100)
    for i, method in enumerate(["a", "b", "a", "c"]):
        queue.push(query(method=method, i=i))
    form_batch(queue, 2, 0.0, False)  # takes a0, a2; b1 is held back and restored
    queue.push(query(method="b", i=9))
    assert [q.kwargs["i"] for q in (queue.pop(), queue.pop(), queue.pop())] == [1, 3, 9]


def test_expired_queries_are_split_out_when_dropping() -> None:
    queue = BackendQueue(100)
    queue.push(query(1.0, i=0))
    queue.push(query(3.0, i=1))
    batch = form_batch(queue, 5, now=2.0, drop_expired=True)
    assert [q.kwargs["i"] for q in batch.expired] == [0]
    assert [q.kwargs["i"] for q in batch.queries] == [1]
    queue.push(query(1.0, i=2))
    assert [q.kwargs["i"] for q in form_batch(queue, 5, now=2.0, drop_expired=False).queries] == [2]


def test_batch_waits_until_its_oldest_query_waited_long_enough() -> None:
    queue = BackendQueue(100)
    queue.push(query(arrival=1.0, i=0))
    queue.push(query(arrival=1.5, i=1))
    waiting = form_batch(queue, 4, now=1.6, drop_expired=False, wait_s=1.0)
    assert (waiting.queries, waiting.wait_until, len(queue)) == ([], 2.0, 2)  # both still queued
    leaving = form_batch(queue, 4, now=2.0, drop_expired=False, wait_s=1.0)
    assert [q.kwargs["i"] for q in leaving.queries] == [0, 1] and leaving.wait_until is None


def test_full_batch_and_zero_wait_leave_at_once() -> None:
    queue = BackendQueue(100)
    for n in range(3):
        queue.push(query(arrival=1.0, i=n))
    assert len(form_batch(queue, 3, now=1.0, drop_expired=False, wait_s=5.0).queries) == 3
    queue.push(query(arrival=1.0, i=3))
    assert len(form_batch(queue, 3, now=1.0, drop_expired=False, wait_s=0.0).queries) == 1


def test_batch_leaves_early_for_its_tightest_deadline_and_execution_time() -> None:
    queue = BackendQueue(100)
    queue.push(query(deadline=1.2, arrival=1.0, i=0))
    queue.push(query(arrival=1.0, i=1))
    waiting = form_batch(queue, 8, now=1.0, drop_expired=False, wait_s=1.0)
    assert waiting.wait_until == pytest.approx(1.2 - DEADLINE_LEAD_S)
    slow = form_batch(queue, 8, now=1.0, drop_expired=False, wait_s=1.0, execution_time=lambda n: 0.05 * n)
    assert slow.wait_until == pytest.approx(1.1 - DEADLINE_LEAD_S)  # 1.2 minus 50 ms for each of 2 queries
    assert len(form_batch(queue, 8, now=1.1, drop_expired=False, wait_s=1.0, execution_time=lambda n: 0.1).queries) == 2


def test_execution_times_per_size_bucket() -> None:
    times = ExecutionTimes()
    assert times.estimate(5) == 0.0  # nothing seen: as if instant
    times.observe(1, 0.010)
    assert times.estimate(1) == 0.010 and times.estimate(6) == 0.010  # borrows the nearest smaller bucket
    times.observe(4, 0.040)
    assert times.estimate(7) == 0.040 and times.estimate(3) == 0.010  # 4-7 share a bucket; 2-3 borrow 1
    times.observe(5, 0.080)
    assert 0.040 < times.estimate(4) < 0.080  # a moving average, not the last sample


def test_fake_clock_fires_timers_in_time_order_in_the_calling_thread() -> None:
    clock = FakeClock(start=0.0)
    fired: list[tuple[str, float]] = []
    clock.call_at(2.0, lambda: fired.append(("b", clock.monotonic())))
    clock.call_later(1.0, lambda: fired.append(("a", clock.monotonic())))
    cancelled = clock.call_at(1.5, lambda: fired.append(("x", clock.monotonic())))
    cancelled.cancel()
    clock.call_at(2.5, lambda: clock.call_later(0.2, lambda: fired.append(("c", clock.monotonic()))))
    assert clock.pending == 3
    clock.advance(1.9)
    assert fired == [("a", 1.0)] and clock.monotonic() == 1.9
    clock.advance(1.0)
    assert fired == [("a", 1.0), ("b", 2.0), ("c", 2.7)]  # one armed by a timer fired in the same step
    assert clock.monotonic() == pytest.approx(2.9) and clock.pending == 0
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_fake_clock_never_goes_back_after_a_nested_advance() -> None:
    clock = FakeClock(start=0.0)
    clock.call_at(0.1, lambda: clock.advance(0.6))
    clock.advance(0.3)
    assert clock.monotonic() == pytest.approx(0.7)


def test_a_timer_beyond_the_longest_wait_does_not_stop_the_clock() -> None:
    clock = SystemClock()
    fired = threading.Event()
    clock.call_later(1e13, fired.set)  # past threading.TIMEOUT_MAX
    clock.call_later(0.0, fired.set)
    assert fired.wait(10.0)
    clock.close()


def test_system_clock_timers_fire_on_one_thread() -> None:
    clock = SystemClock()
    fired = threading.Event()
    clock.call_later(3600, fired.set).cancel()
    clock.call_later(0.0, fired.set)
    assert fired.wait(10.0)
    clock.close()
    assert not any(thread.name == "serve-clock" for thread in threading.enumerate())


def test_slo_to_deadline() -> None:
    clock = FakeClock(start=100.0, wall_offset=1_000.0)
    assert SLO.parse(relative_slo_ms=250).deadline(clock) == pytest.approx(100.25)
    # absolute: wall time 1100 s + 2 s -> monotonic 102
    assert SLO.parse(absolute_slo_ms=1_102_000).deadline(clock) == pytest.approx(102.0)
    assert SLO.parse().deadline(clock) == NO_DEADLINE
    assert SLO.parse(relative_slo_ms="5").relative_ms == 5.0


@pytest.mark.parametrize(
    ("relative", "absolute", "match"),
    [(1, 1, "not both"), (-1, None, ">= 0"), ("soon", None, "number"), (None, float("inf"), "finite"),
     (True, None, "number")],
)
def test_slo_validation(relative: object, absolute: object, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        SLO.parse(relative, absolute)


def test_a_serve_future_has_every_field_of_a_future_and_builds_its_condition_on_first_use() -> None:
    """ServeFuture skips Future.__init__ (its Condition is the bulk of a queued query's memory)."""
    future = ServeFuture()
    assert set(vars(Future())) - {"_condition"} <= set(vars(future))  # a new Python's Future fields show here
    assert "_built_condition" not in vars(future) and not future.done()
    waiter = ThreadPoolExecutor(1)
    try:
        waiting = waiter.submit(future.result, 30)  # waits on the condition another thread set up
        future.set_running_or_notify_cancel()
        future.set_result(7)
        assert waiting.result(30) == 7
        assert future._condition is future._condition  # one condition, built once
        assert wait([future], 0).done == {future}
    finally:
        waiter.shutdown()


def test_a_queued_serve_future_cancels_and_calls_back_like_a_future() -> None:
    future, seen = ServeFuture(), list[Future[object]]()
    future.add_done_callback(seen.append)
    assert future.cancel() and future.cancelled() and seen == [future]


def test_serve_futures_work_with_wait_first_exception_and_as_completed() -> None:
    """``wait`` calls ``f.exception()`` holding every future's lock: the lock must be re-entrant."""
    failed: Future[int] = ServeFuture()
    pending: Future[int] = ServeFuture()
    failed.set_running_or_notify_cancel()
    failed.set_exception(ValueError("boom"))
    done, not_done = wait([failed, pending], timeout=30, return_when=FIRST_EXCEPTION)
    assert (done, not_done) == ({failed}, {pending})
    pending.set_running_or_notify_cancel()
    pending.set_result(1)
    assert set(as_completed([failed, pending], timeout=30)) == {failed, pending}
    with pytest.raises(InvalidStateError):
        pending.set_result(2)  # answered once

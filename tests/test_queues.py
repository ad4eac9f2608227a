"""Deadline-ordered queues and batch formation (pure, on a fake clock)."""

from __future__ import annotations

import pytest

from serve_core.batching import form_batch
from serve_core.errors import BackPressureError, ValidationError
from serve_core.queues import NO_DEADLINE, BackendQueue, Query, ServeFuture
from serve_core.slo import SLO
from serve_core.testing import FakeClock


def query(deadline: float = NO_DEADLINE, method: str = "__call__", **kwargs: object) -> Query:
    return Query("e", method, dict(kwargs), None, deadline, None, ServeFuture(), 0.0, backend="b")


def test_earliest_deadline_first_then_arrival() -> None:
    queue = BackendQueue(100)
    items = [query(5.0, i=0), query(NO_DEADLINE, i=1), query(1.0, i=2), query(5.0, i=3), query(NO_DEADLINE, i=4)]
    for item in items:
        queue.push(item)
    assert [queue.pop().kwargs["i"] for _ in range(5)] == [2, 0, 3, 1, 4]


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

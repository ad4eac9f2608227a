"""Streaming from Python: ``handle.options(stream=True).remote()`` on every executor (docs/streaming.md)."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from serve_core import BackendConfig, Serve
from serve_core.errors import DeadlineExceededError, ReplicaDiedError, ServeTypeError
from serve_core.handle import StreamingHandle
from serve_core.streams import ServeStream
from serve_core.testing import FakeClock

from .conftest import WAIT
from .procs import wait_until
from .streaming_backends import (
    acounting,
    counting,
    dying,
    endless,
    failing,
    held_call,
    late,
    make_event,
    plain,
    with_context,
)


@pytest.fixture
def event(executor: str) -> Iterator[Callable[[], Any]]:
    managers: list[Any] = []
    yield lambda: make_event(executor, managers)
    for manager in managers:
        manager.shutdown()


def _endpoint(srv: Serve, target: Any, name: str = "s", **config: Any) -> None:
    srv.create_endpoint(name)
    srv.create_backend(target, f"{name}:v1", backend_config=BackendConfig(**config))
    srv.link(name, f"{name}:v1")


@pytest.mark.parametrize("target", [counting, acounting], ids=["generator", "async-generator"])
def test_items_come_in_order_and_finally_runs(srv: Serve, event: Callable[[], Any], target: Any) -> None:
    _endpoint(srv, target)
    finished = event()
    handle = srv.get_handle("s").options(stream=True)
    assert isinstance(handle, StreamingHandle)
    stream = handle.remote(n=200, finished=finished)
    assert isinstance(stream, ServeStream)
    assert list(stream) == list(range(200))
    assert finished.wait(WAIT)


@pytest.mark.parametrize("target", [counting, acounting], ids=["generator", "async-generator"])
def test_async_iteration(srv: Serve, target: Any) -> None:
    _endpoint(srv, target)
    handle = srv.get_handle("s").options(stream=True)

    async def read() -> list[int]:
        return [item async for item in handle.remote(n=100)]

    assert asyncio.run(read()) == list(range(100))


@pytest.mark.parametrize("how", ["close", "with", "drop", "aclose"])
def test_closing_early_stops_the_generator_in_its_replica(srv: Serve, event: Callable[[], Any], how: str) -> None:
    _endpoint(srv, endless)
    finished = event()
    stream = srv.get_handle("s").options(stream=True).remote(finished=finished)
    if how == "close":
        assert next(stream) == "tick\n"
        stream.close()
    elif how == "with":
        with stream:
            for _ in stream:
                break
    elif how == "drop":
        for _ in stream:
            break
        del stream
        gc.collect()
    else:

        async def read() -> None:
            assert await stream.__anext__() == "tick\n"
            await stream.aclose()

        asyncio.run(read())
    assert finished.wait(WAIT), "the generator's finally did not run"
    # The slot is free again: the next call runs.
    assert next(iter(srv.get_handle("s").options(stream=True).remote())) == "tick\n"


def test_a_running_stream_holds_its_replica(srv: Serve) -> None:
    _endpoint(srv, counting, max_concurrent_queries=1)
    handle = srv.get_handle("s").options(stream=True)
    first = handle.remote(n=1000)
    assert next(first) == 0
    second = handle.remote(n=2)
    assert not second.future.done()  # queued behind the running stream (one call at a time)
    first.close()
    assert list(second) == [0, 1]


def test_a_generator_called_without_stream_fails_clearly(srv: Serve, event: Callable[[], Any]) -> None:
    _endpoint(srv, counting)
    with pytest.raises(ServeTypeError, match=r"options\(stream=True\)"):
        srv.get_handle("s").remote(n=3).result(WAIT)
    assert list(srv.get_handle("s").options(stream=True).remote(n=2)) == [0, 1]


def test_a_plain_backend_streams_its_result_as_one_item(srv: Serve) -> None:
    _endpoint(srv, plain)
    assert list(srv.get_handle("s").options(stream=True).remote(x=21)) == [42]


def test_errors_before_and_after_the_first_item(srv: Serve) -> None:
    _endpoint(srv, failing)
    handle = srv.get_handle("s").options(stream=True)
    with pytest.raises(ValueError, match="fell over"):
        next(handle.remote(after=0))  # no item yet: the call's error
    stream = handle.remote(after=2)
    assert [next(stream), next(stream)] == ["item 0\n", "item 1\n"]
    with pytest.raises(ValueError, match="fell over"):
        next(stream)
    with pytest.raises(StopIteration):
        next(stream)  # ended
    stats = srv.stat()
    assert stats["s:v1_error_counter"] == 2
    assert stats["s:v1_stream_counter"] == 1  # the one that started streaming
    assert stats["s:v1_stream_item_counter"] == 2


def test_the_generator_body_sees_its_call_context(srv: Serve) -> None:
    _endpoint(srv, with_context)
    assert list(srv.get_handle("s").options(stream=True).remote()) == [False, None]


def test_stream_metrics_in_stat(srv: Serve) -> None:
    _endpoint(srv, counting)
    for n in (3, 5):
        assert len(list(srv.get_handle("s").options(stream=True).remote(n=n))) == n
    stats = srv.stat()
    assert stats["s:v1_stream_counter"] == 2
    assert stats["s:v1_stream_item_counter"] == 8
    assert stats["s:v1_request_counter"] == 2
    assert stats["s:v1_stream_duration_s_50th_perc_60_window"] >= 0


def test_options_keep_streaming_until_turned_off(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="inline")
    _endpoint(srv, counting)
    handle = srv.get_handle("s").options(stream=True).options(relative_slo_ms=10_000)
    assert isinstance(handle, StreamingHandle)
    assert not isinstance(handle.options(stream=False), StreamingHandle)
    assert "StreamingHandle" in repr(handle)


def test_a_worker_that_dies_mid_stream_ends_it_and_is_replaced(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="process")
    _endpoint(srv, dying)
    stream = srv.get_handle("s").options(stream=True).remote()
    assert next(stream) == 0
    with pytest.raises(ReplicaDiedError, match="while it streamed"):
        next(stream)
    assert wait_until(lambda: srv.stat()["backend_s:v1_num_replicas"] == 1, WAIT)
    assert next(srv.get_handle("s").options(stream=True).remote()) == 0  # a new worker serves


def test_the_call_timeout_bounds_the_first_item_only(make_serve: Callable[..., Serve]) -> None:
    clock = FakeClock()
    srv = make_serve(executor="thread", clock=clock)
    _endpoint(srv, held_call, call_timeout_s=1.0)
    release = threading.Event()
    stream = srv.get_handle("s").options(stream=True).remote(release=release)
    assert next(stream) == "first\n"
    clock.advance(5.0)  # past call_timeout_s, after the first item: the stream goes on
    release.set()
    assert list(stream) == [{"n": 1}, b"raw\n"]

    _endpoint(srv, late, name="l", call_timeout_s=1.0)
    gate = threading.Event()
    blocked = srv.get_handle("l").options(stream=True).remote(gate=gate)
    assert wait_until(blocked.future.running, WAIT)
    clock.advance(5.0)  # no first item yet: the call times out
    with pytest.raises(DeadlineExceededError, match="call_timeout_s"):
        next(blocked)
    gate.set()

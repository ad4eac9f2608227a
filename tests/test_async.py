"""Async backends: one event loop per replica, concurrency, context, running loops, cancellation.

Concurrency is shown without timing: each of five calls waits (bounded) until all five have
started, which calls run one at a time never reach (the first fails with ``TimeoutError``).
Backends meant for worker processes are built inside functions, so cloudpickle ships
them by value (workers never import this module). Ray's behaviour is documented in
docs/executors.md; its async support is not built yet.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from typing import Any

import pytest
from werkzeug.test import EnvironBuilder

import serve_core as serve
from serve_core import BackendConfig, Serve
from serve_core.executors.base import Call, ReplicaSpec
from serve_core.executors.thread import ThreadExecutor
from serve_core.http.request import ServeRequest
from serve_core.invoke import REQUEST_ID_KEY, is_async_target

from .conftest import WAIT

NAP_S = 0.2
CALLS = 5


def deploy(srv: Serve, target: Any, *init_args: Any, **config: Any) -> serve.ServeHandle:
    srv.create_endpoint("ep")
    srv.create_backend(target, "b", *init_args, backend_config=BackendConfig(**config))
    srv.link("ep", "b")
    return srv.get_handle("ep")


def nap_backend() -> Any:
    async def nap(*, i: int = 0) -> int:
        await asyncio.sleep(NAP_S)
        return i

    return nap


def gather_backend() -> Any:
    class Gather:
        """Each call waits (bounded) until ``expect`` calls of its ``round`` have started, then answers ``i``."""

        def __init__(self) -> None:
            self.rounds: dict[str, tuple[list[int], asyncio.Event]] = {}

        async def __call__(self, *, i: int = 0, round: str = "", expect: int = 1) -> int:
            count, all_in = self.rounds.setdefault(round, ([0], asyncio.Event()))
            count[0] += 1
            if count[0] >= expect:
                all_in.set()
            await asyncio.wait_for(all_in.wait(), WAIT)  # one call at a time: the first fails here
            return i

    return Gather


def context_backend() -> Any:
    class Context:
        """Reads the call's context before and after waiting for :data:`CALLS` calls to have started."""

        def __init__(self) -> None:
            self.started = 0
            self.all_in = asyncio.Event()

        async def __call__(self, request: Any) -> tuple[Any, ...]:
            before = (serve.context.web, serve.context.request_id, serve.context.batch_size)
            self.started += 1
            if self.started >= CALLS:
                self.all_in.set()
            await asyncio.wait_for(self.all_in.wait(), WAIT)  # the other calls run meanwhile, on this loop
            after = (serve.context.web, serve.context.request_id, serve.context.batch_size)
            return before, after

    return Context


def hanging_backend() -> Any:
    class Hang:
        """``started`` is set once a call runs; its ``finally`` sets ``cleaned``."""

        def __init__(self, started: Any, cleaned: Any) -> None:
            self.started, self.cleaned = started, cleaned

        async def __call__(self) -> str:
            self.started.set()
            try:
                await asyncio.sleep(60)
            finally:
                self.cleaned.set()
            return "not cancelled"

        async def ping(self) -> str:
            return "pong"

        def blocking(self) -> str:
            self.started.set()
            self.cleaned.wait(WAIT)  # holds the loop: a synchronous method cannot be cancelled
            return "finished"

    return Hang


@pytest.fixture(params=["thread", "process"])
def loop_executor(request: pytest.FixtureRequest) -> str:
    """Executors that give an async backend an event loop of its own."""
    return str(request.param)


@pytest.fixture
def make_event(loop_executor: str) -> Iterator[Callable[[], Any]]:
    """Events a backend can set on the executor under test (a manager's Event for worker processes)."""
    managers: list[Any] = []

    def build() -> Any:
        if loop_executor == "thread":
            return threading.Event()
        if not managers:
            import multiprocessing

            managers.append(multiprocessing.get_context("spawn").Manager())
        return managers[0].Event()

    yield build
    for manager in managers:
        manager.shutdown()


def web_request(request_id: str) -> ServeRequest:
    environ = EnvironBuilder(path="/ep").get_environ()
    environ[REQUEST_ID_KEY] = request_id
    return ServeRequest(environ)


# ------------------------------------------------------------------ detection
def test_async_targets_are_detected() -> None:
    class Sync:
        def __call__(self) -> None: ...

    class Mixed:
        def __call__(self) -> None: ...

        async def other(self) -> None: ...

    class AsyncWarmup:
        async def warmup(self) -> None: ...

    async def function() -> None: ...

    assert is_async_target(function) and is_async_target(Mixed) and is_async_target(AsyncWarmup)
    assert not is_async_target(Sync) and not is_async_target(lambda: None)


# ---------------------------------------------------------------- concurrency
def test_async_calls_run_concurrently(make_serve: Callable[..., Serve], loop_executor: str) -> None:
    handle = deploy(make_serve(executor=loop_executor), gather_backend(), max_concurrent_queries=CALLS)
    futures = [handle.remote(i=i, round="five", expect=CALLS) for i in range(CALLS)]
    assert [future.result(WAIT * 2) for future in futures] == list(range(CALLS))  # all five were in at once


def test_async_default_is_one_call_at_a_time(make_serve: Callable[..., Serve]) -> None:
    class Peak:
        def __init__(self) -> None:
            self.running = self.peak = 0

        async def __call__(self) -> None:
            self.running += 1
            self.peak = max(self.peak, self.running)
            await asyncio.sleep(0.01)
            self.running -= 1

        def seen(self) -> int:
            return self.peak

    handle = deploy(make_serve(executor="thread"), Peak)  # max_concurrent_queries left to the default
    for future in [handle.remote() for _ in range(4)]:
        future.result(WAIT)
    assert handle.options(method_name="seen").remote().result(WAIT) == 1


def test_context_is_per_call_under_concurrency(make_serve: Callable[..., Serve], loop_executor: str) -> None:
    srv = make_serve(executor=loop_executor)
    deploy(srv, context_backend(), max_concurrent_queries=CALLS)
    web = [srv.enqueue("ep", request=web_request(f"req-{i}")) for i in range(3)]
    python = [srv.enqueue("ep", kwargs={}) for _ in range(2)]  # CALLS in all: each waits for the others
    assert [future.result(WAIT * 2) for future in web] == [((True, f"req-{i}", None),) * 2 for i in range(3)]
    assert [future.result(WAIT * 2) for future in python] == [((False, None, None),) * 2] * 2


def test_async_batches_run_on_the_loop(make_serve: Callable[..., Serve]) -> None:
    @serve.accept_batch
    async def double(*, x: list[int]) -> list[Any]:
        await asyncio.sleep(0)
        return [(value * 2, serve.context.batch_size) for value in x]

    handle = deploy(make_serve(executor="thread"), double, max_batch_size=4)
    assert handle.remote(x=3).result(WAIT) == (6, 1)


def test_class_built_and_warmed_up_on_the_replica_loop(make_serve: Callable[..., Serve]) -> None:
    class LoopBound:
        def __init__(self) -> None:
            self.built_on = asyncio.get_running_loop()  # a client session made here works in the calls
            self.lock = asyncio.Lock()

        async def warmup(self) -> None:
            self.warmed_on = asyncio.get_running_loop()

        async def __call__(self) -> bool:
            async with self.lock:
                loop = asyncio.get_running_loop()
                return loop is self.built_on and loop is self.warmed_on

    assert deploy(make_serve(executor="thread"), LoopBound).remote().result(WAIT) is True


def test_constructor_error_of_an_async_class(make_serve: Callable[..., Serve], loop_executor: str) -> None:
    class Broken:
        def __init__(self) -> None:
            raise ValueError("no model here")

        async def __call__(self) -> None: ...

    srv = make_serve(executor=loop_executor)
    srv.create_endpoint("ep")
    with pytest.raises(ValueError, match="no model here"):
        srv.create_backend(Broken, "b")


def test_sync_and_async_methods_of_one_class(make_serve: Callable[..., Serve], make_event: Callable[[], Any],
                                            loop_executor: str) -> None:
    started, cleaned = make_event(), make_event()
    handle = deploy(make_serve(executor=loop_executor), hanging_backend(), started, cleaned)
    assert handle.options(method_name="ping").remote().result(WAIT) == "pong"
    future = handle.options(method_name="blocking").remote()
    assert started.wait(WAIT)
    assert future.cancel() is False  # synchronous code holds the loop: it cannot be cancelled
    cleaned.set()
    assert future.result(WAIT) == "finished"


@pytest.mark.parametrize("error", [SystemExit, KeyboardInterrupt, asyncio.CancelledError])
def test_base_exceptions_of_async_code_are_answers(make_serve: Callable[..., Serve], loop_executor: str,
                                                   error: type[BaseException]) -> None:
    async def backend(*, fail: bool = False) -> str:
        if fail:
            raise error("from the backend")  # on the loop: the task must not let it end the loop
        return "alive"

    handle = deploy(make_serve(executor=loop_executor), backend)
    expected = CancelledError if error is asyncio.CancelledError else error  # what result() raises
    with pytest.raises(expected):
        handle.remote(fail=True).result(WAIT)
    assert handle.remote().result(WAIT) == "alive"


# ------------------------------------------------------------- running loops
def test_inline_async_inside_asyncio_run(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="inline")
    handle = deploy(srv, gather_backend(), max_concurrent_queries=CALLS)
    srv.create_endpoint("sync")
    srv.create_backend(lambda: "sync", "s")
    srv.link("sync", "s")

    async def main() -> tuple[int, list[int], str]:
        one = await handle.remote(i=7)
        many = await asyncio.gather(*[handle.remote(i=i, round="five", expect=CALLS) for i in range(CALLS)])
        return one, list(many), srv.get_handle("sync").remote().result(WAIT)  # sync: done at once

    one, many, sync = asyncio.run(main())
    assert (one, many, sync) == (7, list(range(CALLS)), "sync")  # the five ran as tasks at once


def test_inline_async_without_a_loop_is_unchanged(make_serve: Callable[..., Serve]) -> None:
    handle = deploy(make_serve(executor="inline"), nap_backend())
    future = handle.remote(i=3)
    assert future.done() and future.result() == 3  # ran to completion on the replica's private loop


def test_inline_async_warmup_inside_a_running_loop(make_serve: Callable[..., Serve]) -> None:
    class Warm:
        async def warmup(self) -> None:
            self.ready = await asyncio.sleep(0, result=True)

        async def __call__(self) -> bool:
            return self.ready

    srv = make_serve(executor="inline")

    async def main() -> bool:
        handle = deploy(srv, Warm)  # the constructor and warmup run while this loop runs
        return await handle.remote()

    assert asyncio.run(main()) is True


def test_inline_calls_left_when_the_loop_ends_are_answered(make_serve: Callable[..., Serve]) -> None:
    handle = deploy(make_serve(executor="inline"), nap_backend())  # one call at a time: the second queues
    left: list[Any] = []

    async def leave_early() -> None:
        left.extend([handle.remote(i=1), handle.remote(i=2)])  # never awaited

    asyncio.run(leave_early())  # cancels the running call; the queued one starts as the loop ends
    for future in left:
        with pytest.raises(CancelledError):
            future.result(WAIT)

    async def again() -> int:
        return await handle.remote(i=3)

    assert asyncio.run(again()) == 3  # the replica was not left holding a call nobody runs


@pytest.mark.parametrize("executor_name", ["inline", "thread", "process"])
def test_await_handle_from_any_loop(make_serve: Callable[..., Serve], executor_name: str) -> None:
    handle = deploy(make_serve(executor=executor_name), nap_backend(), max_concurrent_queries=2)

    async def call(i: int) -> int:
        return await handle.remote(i=i)

    answers: list[int] = []
    other = threading.Thread(target=lambda: answers.append(asyncio.run(call(2))))
    other.start()  # a second loop, on another thread, at the same time
    answers.append(asyncio.run(call(1)))
    other.join(WAIT)
    assert sorted(answers) == [1, 2]


# --------------------------------------------------------------- cancellation
def test_cancel_reaches_a_running_async_call(make_serve: Callable[..., Serve], make_event: Callable[[], Any],
                                            loop_executor: str) -> None:
    started, cleaned = make_event(), make_event()
    handle = deploy(make_serve(executor=loop_executor), hanging_backend(), started, cleaned)
    future = handle.remote()
    assert started.wait(WAIT)
    assert future.running() and future.cancel() is True
    with pytest.raises(CancelledError):
        future.result(WAIT)
    assert cleaned.wait(WAIT)  # the task saw CancelledError: its finally ran
    assert future.cancel() is False  # answered: nothing left to cancel
    assert handle.options(method_name="ping").remote().result(WAIT) == "pong"  # the replica lives on


def test_cancel_withdraws_a_queued_async_call(make_serve: Callable[..., Serve], make_event: Callable[[], Any],
                                             loop_executor: str) -> None:
    started, cleaned = make_event(), make_event()
    handle = deploy(make_serve(executor=loop_executor), hanging_backend(), started, cleaned)
    running = handle.remote()
    assert started.wait(WAIT)
    queued = handle.options(method_name="ping").remote()  # waits: one call at a time by default
    assert queued.cancel() is True and queued.cancelled()
    assert running.cancel() is True
    with pytest.raises(CancelledError):
        running.result(WAIT)


def test_cancelling_the_awaiting_task_cancels_the_call(make_serve: Callable[..., Serve]) -> None:
    started, cleaned = threading.Event(), threading.Event()
    handle = deploy(make_serve(executor="thread"), hanging_backend(), started, cleaned)

    async def main() -> None:
        waiter = asyncio.ensure_future(handle.remote())
        assert await asyncio.to_thread(started.wait, WAIT)
        waiter.cancel()  # asyncio cancels the ServeFuture it waits on, which cancels the call
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(main())
    assert cleaned.wait(WAIT)


def test_inline_cancel_inside_asyncio_run(make_serve: Callable[..., Serve]) -> None:
    async def hang(*, started: asyncio.Event, cleaned: asyncio.Event) -> str:
        started.set()
        try:
            await asyncio.sleep(60)
        finally:
            cleaned.set()
        return "not cancelled"

    handle = deploy(make_serve(executor="inline"), hang)

    async def main() -> None:
        for how in ("future", "task"):
            started, cleaned = asyncio.Event(), asyncio.Event()
            future = handle.remote(started=started, cleaned=cleaned)
            waiter = asyncio.ensure_future(asyncio.wrap_future(future))
            await asyncio.wait_for(started.wait(), WAIT)
            if how == "future":
                assert future.cancel() is True
            else:
                waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            await asyncio.wait_for(cleaned.wait(), WAIT)
            with pytest.raises(CancelledError):
                future.result(WAIT)

    asyncio.run(main())


def test_stopping_a_loop_replica_cancels_what_outlives_its_drain() -> None:
    started, cleaned = threading.Event(), threading.Event()
    spec = ReplicaSpec("b", "b#1", hanging_backend(), (started, cleaned), BackendConfig())
    replica = ThreadExecutor().start_replica(spec)
    future = replica.submit(Call("__call__", False, False, (None,), ({},)))
    assert started.wait(WAIT)
    replica.stop(0.05)  # the drain timeout under test
    assert cleaned.wait(WAIT) and not replica.alive
    [outcome] = future.result(WAIT)
    assert not outcome.ok and isinstance(outcome.value, CancelledError)


def test_a_running_sync_call_still_cannot_be_cancelled(make_serve: Callable[..., Serve]) -> None:
    started, release = threading.Event(), threading.Event()

    def block() -> str:
        started.set()
        release.wait(WAIT)
        return "done"

    future = deploy(make_serve(executor="thread"), block).remote()
    assert started.wait(WAIT)
    assert future.cancel() is False
    release.set()
    assert future.result(WAIT) == "done"

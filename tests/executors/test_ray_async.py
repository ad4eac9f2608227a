"""Async backends on Ray: an async actor per replica, calls at once, context per call, cancellation.

Concurrency is shown by the calls' own start and end stamps overlapping (each call starts
before any ends), not by wall time: Ray's round trips on a loaded machine vary.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import Any

import pytest

import serve_core as serve
from serve_core import BackendConfig, ReplicaDiedError, Serve

from ..conftest import WAIT
from ..ray_fixtures import RayEvent
from ..test_async import context_backend, hanging_backend, web_request

pytestmark = pytest.mark.ray

CALLS = 5


@pytest.fixture
def rsrv(make_serve: Callable[..., Serve], ray_local: Any) -> Serve:
    return make_serve(executor="ray")


def deploy(srv: Serve, target: Any, *init_args: Any, **config: Any) -> serve.ServeHandle:
    srv.create_endpoint("ep")
    srv.create_backend(target, "b", *init_args, backend_config=BackendConfig(**config))
    srv.link("ep", "b")
    return srv.get_handle("ep")


def stamped_backend() -> Any:
    class Stamped:
        """Each call sleeps 0.2 s, then waits (bounded) until ``expect`` calls of its round have started:
        on a loaded machine the driver may hand the fifth call over after the first one slept, and the
        stamps then still tell whether they ran at once (one at a time, the first would wait in vain)."""

        def __init__(self) -> None:
            self.rounds: dict[str, tuple[list[int], asyncio.Event]] = {}

        async def __call__(self, *, i: int = 0, round: str = "", expect: int = 1) -> tuple[int, float, float]:
            started = time.time()  # one machine: the actors' clocks are this process's
            count, all_in = self.rounds.setdefault(round, ([0], asyncio.Event()))
            count[0] += 1
            if count[0] >= expect:
                all_in.set()
            await asyncio.sleep(0.2)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(all_in.wait(), WAIT)
            return i, started, time.time()

    return Stamped


def test_async_calls_overlap_on_one_actor(rsrv: Serve) -> None:
    handle = deploy(rsrv, stamped_backend(), max_concurrent_queries=CALLS)
    handle.remote().result(WAIT)
    calls = [handle.remote(i=i, round="five", expect=CALLS) for i in range(CALLS)]
    answers = [future.result(WAIT * 2) for future in calls]
    assert [i for i, _, _ in answers] == list(range(CALLS))
    assert max(start for _, start, _ in answers) < min(end for _, _, end in answers)  # all ran at once
    (replica,) = rsrv.replicas("b")
    assert type(replica).__name__ == "RayAsyncReplica"


def test_async_default_is_one_call_at_a_time(rsrv: Serve) -> None:
    handle = deploy(rsrv, stamped_backend())
    answers = sorted(future.result(WAIT) for future in [handle.remote(i=i) for i in range(3)])
    for (_, _, end), (_, start, _) in zip(answers, answers[1:]):
        assert end <= start  # the original's rule: one after the other


def test_context_is_per_call_on_ray(rsrv: Serve) -> None:
    deploy(rsrv, context_backend(), max_concurrent_queries=CALLS)
    web = [rsrv.enqueue("ep", request=web_request(f"req-{i}")) for i in range(3)]
    python = [rsrv.enqueue("ep", kwargs={}) for _ in range(2)]
    assert [future.result(WAIT) for future in web] == [((True, f"req-{i}", None),) * 2 for i in range(3)]
    assert [future.result(WAIT) for future in python] == [((False, None, None),) * 2] * 2


def test_cancel_reaches_a_running_async_call_on_ray(rsrv: Serve) -> None:
    started, cleaned = RayEvent(), RayEvent()
    handle = deploy(rsrv, hanging_backend(), started, cleaned, max_concurrent_queries=2)
    future = handle.remote()
    assert started.wait(WAIT)
    assert future.running() and future.cancel() is True
    with pytest.raises(CancelledError):
        future.result(WAIT)
    assert cleaned.wait(WAIT)  # the task saw CancelledError: its finally ran
    assert handle.options(method_name="ping").remote().result(WAIT) == "pong"  # the replica lives on


def test_a_dead_async_actor_fails_its_calls_and_is_replaced(rsrv: Serve, ray_local: Any) -> None:
    started, cleaned = RayEvent(), RayEvent()
    handle = deploy(rsrv, hanging_backend(), started, cleaned, max_concurrent_queries=2)
    future = handle.remote()
    assert started.wait(WAIT)
    from serve_core.executors.ray_async import RayAsyncReplica  # imports Ray: only once it is there

    (replica,) = rsrv.replicas("b")
    assert isinstance(replica, RayAsyncReplica)
    ray_local.kill(replica.actor, no_restart=True)
    with pytest.raises(ReplicaDiedError):
        future.result(WAIT * 3)
    assert handle.options(method_name="ping").remote().result(WAIT * 3) == "pong"  # a replacement took over


def nested_caller() -> Any:
    class Caller:
        async def __call__(self, *, x: int = 0) -> Any:
            model = serve.get_handle("model")
            return await asyncio.gather(model.remote(x=x), model.remote(x=x + 1))

    return Caller


def test_await_handle_remote_inside_an_async_ray_replica(rsrv: Serve) -> None:
    from ..test_composition import deploy_model

    deploy_model(rsrv)
    handle = deploy(rsrv, nested_caller(), max_concurrent_queries=2)
    assert list(handle.remote(x=1).result(WAIT)) == [2, 3]

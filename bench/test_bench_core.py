"""Core overhead: a no-op backend through a handle against the bare stdlib floor.

Pairs measured in the same run (see bench/README.md for how to run):

* (a) one call at a time on the thread executor, ``handle.remote().result()``, against
  ``ThreadPoolExecutor(1).submit(f).result()``: the cost of the serve layer per call on
  top of a plain thread hand-off (target: within 3x);
* (b) 1,000 calls in flight on the thread executor against 1,000 bare submits;
* (c) one call on the inline executor against calling the function directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from typing import Any

import pytest

from serve_core import Serve
from serve_core.handle import ServeHandle

IN_FLIGHT = 1_000
ROUNDS_IN_FLIGHT = 30
WAIT = 60.0  # seconds: the bound on every wait in a benchmark


def noop(request: Any) -> None:
    """The backend under test: does nothing, so only the serving path is measured."""
    return None


def _handle(srv: Serve) -> ServeHandle:
    srv.create_backend(noop, "noop:v0")
    srv.create_endpoint("noop", None)
    srv.link("noop", "noop:v0")
    handle = srv.get_handle("noop")
    handle.remote().result(WAIT)  # warm: resolve the method, start the worker
    return handle


@pytest.fixture(scope="module")
def thread_handle() -> Iterator[ServeHandle]:
    with Serve(executor="thread", start_server=False) as srv:
        yield _handle(srv)


@pytest.fixture(scope="module")
def inline_handle() -> Iterator[ServeHandle]:
    with Serve(executor="inline", start_server=False) as srv:
        yield _handle(srv)


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1) as executor:
        executor.submit(noop, None).result(WAIT)
        yield executor


def _role(benchmark: Any, group: str, role: str, target: float | None = None) -> None:
    benchmark.group = group
    benchmark.extra_info["role"] = role
    if target is not None:
        benchmark.extra_info["target_ratio"] = target


# ------------------------------------------------ (a) single call, thread executor
GROUP_A = "core (a): one call at a time, thread executor"


def test_a_bare_thread_handoff(benchmark: Any, pool: ThreadPoolExecutor) -> None:
    _role(benchmark, GROUP_A, "baseline")
    benchmark(lambda: pool.submit(noop, None).result(WAIT))


def test_a_handle_thread(benchmark: Any, thread_handle: ServeHandle) -> None:
    _role(benchmark, GROUP_A, "subject", target=3.0)
    benchmark(lambda: thread_handle.remote().result(WAIT))


# ------------------------------------------- (b) 1,000 in flight, thread executor
GROUP_B = f"core (b): {IN_FLIGHT} calls in flight, thread executor"


def _settle(futures: list[Future[Any]]) -> None:
    done, not_done = wait_all(futures, timeout=WAIT)
    if not_done:
        raise TimeoutError(f"{len(not_done)} calls not done within {WAIT} s")
    for future in done:
        future.result()


def test_b_bare_thread_throughput(benchmark: Any, pool: ThreadPoolExecutor) -> None:
    _role(benchmark, GROUP_B, "baseline")
    submit = pool.submit

    def burst() -> None:
        _settle([submit(noop, None) for _ in range(IN_FLIGHT)])

    benchmark.pedantic(burst, rounds=ROUNDS_IN_FLIGHT, warmup_rounds=2)


def test_b_handle_thread_throughput(benchmark: Any, thread_handle: ServeHandle) -> None:
    _role(benchmark, GROUP_B, "subject")
    remote = thread_handle.remote

    def burst() -> None:
        _settle([remote() for _ in range(IN_FLIGHT)])

    benchmark.pedantic(burst, rounds=ROUNDS_IN_FLIGHT, warmup_rounds=2)


# ---------------------------------------------------- (c) single call, inline
GROUP_C = "core (c): one call, inline executor"


def test_c_plain_call(benchmark: Any) -> None:
    _role(benchmark, GROUP_C, "baseline")
    benchmark(noop, None)


def test_c_handle_inline(benchmark: Any, inline_handle: ServeHandle) -> None:
    _role(benchmark, GROUP_C, "subject")
    benchmark(lambda: inline_handle.remote().result(WAIT))

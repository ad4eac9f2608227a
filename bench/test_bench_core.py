"""Core overhead: a no-op backend through a handle against the bare stdlib floor.

Pairs measured in the same run (see bench/README.md for how to run):

* (a) one call at a time on the thread executor, ``handle.remote().result()``, against
  ``ThreadPoolExecutor(1).submit(f).result()``: the cost of the serve layer per call on
  top of a plain thread hand-off (target: within 3x);
* (b) 1,000 calls in flight on the thread executor against 1,000 bare submits;
* (c) one call on the inline executor against calling the function directly;
* (d), (e) one call on the thread and inline executors with the Prometheus metrics recorded
  (the default) against the same with ``Serve(metrics=False)`` (target: within 1.05x).

``bench/run_core.py`` measures the same pairs interleaved round by round, which keeps
the ratios steady on a busy machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import pytest

from serve_core import Serve
from serve_core.handle import ServeHandle

from . import core_cases as cases

ROUNDS_IN_FLIGHT = 30
# One-at-a-time calls: each round times a loop of ITERATIONS calls, so the median over
# rounds smooths out the thread wake-up jitter of single hand-offs.
ROUNDS, ITERATIONS = 200, 50


@pytest.fixture(scope="module")
def thread_handle() -> Iterator[ServeHandle]:
    with Serve(executor="thread", start_server=False) as srv:
        yield cases.noop_handle(srv)


@pytest.fixture(scope="module")
def inline_handle() -> Iterator[ServeHandle]:
    with Serve(executor="inline", start_server=False) as srv:
        yield cases.noop_handle(srv)


@pytest.fixture(scope="module")
def thread_handle_unmetered() -> Iterator[ServeHandle]:
    with Serve(executor="thread", start_server=False, metrics=False) as srv:
        yield cases.noop_handle(srv)


@pytest.fixture(scope="module")
def inline_handle_unmetered() -> Iterator[ServeHandle]:
    with Serve(executor="inline", start_server=False, metrics=False) as srv:
        yield cases.noop_handle(srv)


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1) as executor:
        yield cases.warm_pool(executor)


def _role(benchmark: Any, group: str, role: str, target: float | None = None) -> None:
    benchmark.group = group
    benchmark.extra_info["role"] = role
    if target is not None:
        benchmark.extra_info["target_ratio"] = target


def _single(benchmark: Any, call: Callable[[], Any]) -> None:
    benchmark.pedantic(call, rounds=ROUNDS, iterations=ITERATIONS, warmup_rounds=5)


def _burst(benchmark: Any, call: Callable[[], Any]) -> None:
    benchmark.pedantic(call, rounds=ROUNDS_IN_FLIGHT, warmup_rounds=2)


# ------------------------------------------------ (a) single call, thread executor
GROUP_A = "core (a): one call at a time, thread executor"


def test_a_bare_thread_handoff(benchmark: Any, pool: ThreadPoolExecutor) -> None:
    _role(benchmark, GROUP_A, "baseline")
    _single(benchmark, partial(cases.bare_round_trip, pool))


def test_a_handle_thread(benchmark: Any, thread_handle: ServeHandle) -> None:
    _role(benchmark, GROUP_A, "subject", target=3.0)
    _single(benchmark, partial(cases.handle_round_trip, thread_handle))


# ------------------------------------------- (b) 1,000 in flight, thread executor
GROUP_B = f"core (b): {cases.IN_FLIGHT} calls in flight, thread executor"


def test_b_bare_thread_throughput(benchmark: Any, pool: ThreadPoolExecutor) -> None:
    _role(benchmark, GROUP_B, "baseline")
    _burst(benchmark, partial(cases.bare_burst, pool))


def test_b_handle_thread_throughput(benchmark: Any, thread_handle: ServeHandle) -> None:
    _role(benchmark, GROUP_B, "subject")
    _burst(benchmark, partial(cases.handle_burst, thread_handle))


# ---------------------------------------------------- (c) single call, inline
GROUP_C = "core (c): one call, inline executor"


def test_c_plain_call(benchmark: Any) -> None:
    _role(benchmark, GROUP_C, "baseline")
    _single(benchmark, cases.plain_call)


def test_c_handle_inline(benchmark: Any, inline_handle: ServeHandle) -> None:
    _role(benchmark, GROUP_C, "subject")
    _single(benchmark, partial(cases.handle_round_trip, inline_handle))


# ---------------------------------------------- (d), (e) metrics on against off
GROUP_D = "core (d): one call at a time, thread executor, metrics on vs off"
GROUP_E = "core (e): one call, inline executor, metrics on vs off"


def test_d_handle_thread_unmetered(benchmark: Any, thread_handle_unmetered: ServeHandle) -> None:
    _role(benchmark, GROUP_D, "baseline")
    _single(benchmark, partial(cases.handle_round_trip, thread_handle_unmetered))


def test_d_handle_thread_metered(benchmark: Any, thread_handle: ServeHandle) -> None:
    _role(benchmark, GROUP_D, "subject", target=1.05)
    _single(benchmark, partial(cases.handle_round_trip, thread_handle))


def test_e_handle_inline_unmetered(benchmark: Any, inline_handle_unmetered: ServeHandle) -> None:
    _role(benchmark, GROUP_E, "baseline")
    _single(benchmark, partial(cases.handle_round_trip, inline_handle_unmetered))


def test_e_handle_inline_metered(benchmark: Any, inline_handle: ServeHandle) -> None:
    _role(benchmark, GROUP_E, "subject", target=1.05)
    _single(benchmark, partial(cases.handle_round_trip, inline_handle))

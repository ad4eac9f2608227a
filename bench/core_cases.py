"""The operations compared by the core benchmarks, shared by the pytest file and run_core.py."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from typing import Any

from serve_core import Serve
from serve_core.handle import ServeHandle

IN_FLIGHT = 1_000
WAIT = 60.0  # seconds: the bound on every wait in a benchmark


def noop(request: Any) -> None:
    """The backend under test: does nothing, so only the serving path is measured."""
    return None


def noop_handle(srv: Serve) -> ServeHandle:
    """Deploy ``noop`` on ``srv`` and return a warmed-up handle to it."""
    srv.create_backend(noop, "noop:v0")
    srv.create_endpoint("noop", None)
    srv.link("noop", "noop:v0")
    handle = srv.get_handle("noop")
    handle.remote().result(WAIT)  # warm: resolve the method, start the worker
    return handle


def warm_pool(pool: ThreadPoolExecutor) -> ThreadPoolExecutor:
    """Start the pool's worker thread so its creation is not measured."""
    pool.submit(noop, None).result(WAIT)
    return pool


def settle(futures: list[Future[Any]]) -> None:
    """Wait for every future (bounded) and surface the first error."""
    done, not_done = wait_all(futures, timeout=WAIT)
    if not_done:
        raise TimeoutError(f"{len(not_done)} calls not done within {WAIT} s")
    for future in done:
        future.result()


def bare_round_trip(pool: ThreadPoolExecutor) -> None:
    pool.submit(noop, None).result(WAIT)


def handle_round_trip(handle: ServeHandle) -> None:
    handle.remote().result(WAIT)


def bare_burst(pool: ThreadPoolExecutor) -> None:
    submit = pool.submit
    settle([submit(noop, None) for _ in range(IN_FLIGHT)])


def handle_burst(handle: ServeHandle) -> None:
    remote = handle.remote
    settle([remote() for _ in range(IN_FLIGHT)])


def plain_call() -> None:
    noop(None)

"""Process executor benchmark: ratios against baselines measured in the same run.

1. Round trip of a no-op call through a handle on the process executor, against a
   bare single-worker ``concurrent.futures.ProcessPoolExecutor`` round trip.
2. Throughput of a CPU-bound pure-Python backend with 1 and 2 replicas, on the
   process executor and on the thread executor (the GIL serialises the latter), next
   to a bare ``ProcessPoolExecutor`` with 1 and 2 workers: the speedup the machine
   itself gives at that moment (other load on a shared machine lowers all of them).
3. How long ``start_replica`` takes: the first one of an executor (which also starts
   its fork server) and the next ones (a fork), and with ``start_method="spawn"``.

Run ``PYTHONPATH=. python bench/bench_process.py`` (or ``python -m pytest
bench/test_bench_process.py -s``). Targets: 2 process replicas >= 1.6x the
throughput of 1 on a 2-core machine; the no-op round trip within 2x of the bare pool.
"""

from __future__ import annotations

import concurrent.futures
import statistics
import time
from typing import Any

from serve_core import BackendConfig, Serve
from serve_core.executors.base import ReplicaSpec
from serve_core.executors.process import ProcessExecutor

ROUND_TRIPS = 2000
REPEATS = 5
CPU_CALLS = 24
CPU_WORK = 200_000  # loop iterations per call: ~10-20 ms of pure Python


def noop() -> None:
    """The bare pool's task (module level so the standard pickler can send it)."""


def _best_per_call(call: Any, count: int) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(count):
            call()
        best = min(best, (time.perf_counter() - start) / count)
    return best


def bare_pool_round_trip() -> float:
    """Seconds per no-op round trip through a 1-worker ``ProcessPoolExecutor``."""
    with concurrent.futures.ProcessPoolExecutor(max_workers=1) as pool:
        pool.submit(noop).result()
        return _best_per_call(lambda: pool.submit(noop).result(), ROUND_TRIPS)


def handle_round_trip() -> float:
    """Seconds per no-op round trip through a handle on the process executor."""

    def nothing() -> None:
        return None

    with Serve(start_server=False, executor="process") as srv:
        srv.create_endpoint("noop")
        srv.create_backend(nothing, "noop:v1")
        srv.link("noop", "noop:v1")
        handle = srv.get_handle("noop")
        handle.remote().result()
        return _best_per_call(lambda: handle.remote().result(), ROUND_TRIPS)


def _burn(flask_request: Any, n: int = CPU_WORK) -> int:
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def _calls_per_s(handle: Any) -> float:
    start = time.perf_counter()
    for future in [handle.remote() for _ in range(CPU_CALLS)]:
        future.result()
    return CPU_CALLS / (time.perf_counter() - start)


def cpu_throughput(executor: str) -> dict[int, float]:
    """Calls per second of a CPU-bound pure-Python backend with 1 and 2 replicas.

    Both instances run side by side and are measured in alternation, best of
    ``REPEATS`` rounds each, so a burst of load from elsewhere hits both alike.
    """
    best = {1: 0.0, 2: 0.0}
    with Serve(start_server=False, executor=executor) as srv:
        handles = {}
        for replicas in best:
            srv.create_endpoint(f"cpu{replicas}")
            config = BackendConfig(num_replicas=replicas)
            srv.create_backend(_burn, f"cpu{replicas}:v1", backend_config=config)
            srv.link(f"cpu{replicas}", f"cpu{replicas}:v1")
            handles[replicas] = srv.get_handle(f"cpu{replicas}")
            _calls_per_s(handles[replicas])  # warm every replica
        for _ in range(REPEATS):
            for replicas, handle in handles.items():
                best[replicas] = max(best[replicas], _calls_per_s(handle))
    return best


def bare_pool_throughput() -> dict[int, float]:
    """The machine's own 2-vs-1 baseline: ``ProcessPoolExecutor`` with 1 and 2 workers."""
    best = {1: 0.0, 2: 0.0}
    with (
        concurrent.futures.ProcessPoolExecutor(max_workers=1) as one,
        concurrent.futures.ProcessPoolExecutor(max_workers=2) as two,
    ):
        pools = {1: one, 2: two}
        for workers, pool in pools.items():
            list(pool.map(_burn, [None] * workers * 2))
        for _ in range(REPEATS):
            for workers, pool in pools.items():
                start = time.perf_counter()
                list(pool.map(_burn, [None] * CPU_CALLS))
                best[workers] = max(best[workers], CPU_CALLS / (time.perf_counter() - start))
    return best


def replica_starts(start_method: str, count: int = REPEATS + 1) -> list[float]:
    """Seconds per ``start_replica`` of a fresh executor, one after the other."""

    def nothing() -> None:
        return None

    executor = ProcessExecutor(start_method=start_method)
    seconds = []
    try:
        for i in range(count):
            start = time.perf_counter()
            replica = executor.start_replica(ReplicaSpec("start", f"start#{i}", nothing, (), BackendConfig()))
            seconds.append(time.perf_counter() - start)
            replica.stop(10)
    finally:
        executor.shutdown()
    return seconds


def run() -> dict[str, float]:
    """Measure everything; returns raw numbers and the ratios."""
    out: dict[str, float] = {
        "bare_pool_round_trip_us": bare_pool_round_trip() * 1e6,
        "handle_round_trip_us": handle_round_trip() * 1e6,
    }
    for executor in ("process", "thread"):
        for replicas, calls_per_s in cpu_throughput(executor).items():
            out[f"{executor}_{replicas}_replicas_calls_per_s"] = calls_per_s
    for workers, calls_per_s in bare_pool_throughput().items():
        out[f"bare_pool_{workers}_workers_calls_per_s"] = calls_per_s
    first, *rest = replica_starts("forkserver")
    out["forkserver_first_replica_start_ms"] = first * 1e3
    out["forkserver_next_replica_start_ms"] = statistics.median(rest) * 1e3
    out["spawn_replica_start_ms"] = statistics.median(replica_starts("spawn")) * 1e3
    out["round_trip_ratio_handle_vs_bare_pool"] = out["handle_round_trip_us"] / out["bare_pool_round_trip_us"]
    for executor in ("process", "thread"):
        one, two = (out[f"{executor}_{n}_replicas_calls_per_s"] for n in (1, 2))
        out[f"{executor}_speedup_2_vs_1_replicas"] = two / one
    out["bare_pool_speedup_2_vs_1_workers"] = (
        out["bare_pool_2_workers_calls_per_s"] / out["bare_pool_1_workers_calls_per_s"]
    )
    return out


def report(results: dict[str, float]) -> str:
    """Human-readable lines, one per measurement."""
    return "\n".join(f"{name:45s} {value:12.2f}" for name, value in results.items())


if __name__ == "__main__":
    print(report(run()))

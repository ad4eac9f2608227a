"""Composition and async concurrency: ratios against baselines measured in the same run.

1. Composition: a two-stage chain (``pipe`` calls ``model`` through a handle given as its init
   argument, and returns its answer) against a single direct call of ``model``, on the thread,
   process and Ray executors. Rounds interleave the two (chain, direct, chain, direct...), each
   round the median of ``CALLS`` sequential round trips; the ratio is the median of the rounds'
   chain/direct ratios. The ideal is about 2 (two calls); what is above it is the hop back to the
   router (a thread hand-off; the worker's pipe to its parent; the gateway actor on Ray).
2. Async throughput: 1,000 concurrent ``asyncio.sleep(0.01)`` calls on one replica with
   ``max_concurrent_queries=100``, on the thread and Ray executors: calls per second, and the
   ratio of the time taken to the lower bound of 0.1 s (ten waves of 100 calls of 10 ms).

   (The case and the bare-loop baseline are ``bench_async.py``'s.)

Run ``PYTHONPATH=. python -m bench.bench_compose [--rounds N] [--skip-ray]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

from bench.bench_async import CALLS as ASYNC_CALLS
from bench.bench_async import CONCURRENCY as ASYNC_CONCURRENCY
from bench.bench_async import SLEEP_S as NAP_S
from bench.bench_async import bare_loop, through_serve
from bench.bench_async import deploy as deploy_sleeper
from serve_core import Serve, ServeHandle

CALLS = 200  # sequential round trips per round (Ray: a quarter of them)
ASYNC_LOWER_BOUND_S = ASYNC_CALLS / ASYNC_CONCURRENCY * NAP_S


def model_backend() -> Any:
    def model(*, x: int = 0) -> int:
        return x + 1

    return model


def pipe_backend() -> Any:
    class Pipe:
        def __init__(self, model: ServeHandle) -> None:
            self.model = model

        def __call__(self, *, x: int = 0) -> int:
            return int(self.model.remote(x=x).result(60))

    return Pipe


def _median_round_trip(handle: ServeHandle, count: int) -> float:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        handle.remote(x=1).result(60)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def composition(executor: str, rounds: int) -> dict[str, float]:
    """Median seconds of a direct call and of the chain, and the median chain/direct ratio."""
    count = CALLS // 4 if executor == "ray" else CALLS
    with Serve(start_server=False, executor=executor) as srv:
        srv.create_endpoint("model")
        srv.create_backend(model_backend(), "model:v1")
        srv.link("model", "model:v1")
        direct = srv.get_handle("model")
        srv.create_endpoint("pipe")
        srv.create_backend(pipe_backend(), "pipe:v1", direct)
        srv.link("pipe", "pipe:v1")
        chain = srv.get_handle("pipe")
        for handle in (direct, chain):  # warm: first calls, the gateway actor
            for _ in range(5):
                handle.remote(x=1).result(60)
        directs, chains = [], []
        for _ in range(rounds):
            chains.append(_median_round_trip(chain, count))
            directs.append(_median_round_trip(direct, count))
    ratios = [c / d for c, d in zip(chains, directs)]
    return {"direct_s": statistics.median(directs), "chain_s": statistics.median(chains),
            "ratio": statistics.median(ratios)}


def async_throughput(executor: str, rounds: int) -> dict[str, float]:
    """Seconds for 1,000 concurrent 10 ms naps on one replica (``bench_async``'s case), with the bare
    loop's time interleaved; calls per second and the ratios to the lower bound and to the bare loop."""
    srv = deploy_sleeper(executor)
    try:
        runs, bare = [], []
        for _ in range(rounds):
            runs.append(through_serve(srv))
            bare.append(bare_loop())
    finally:
        srv.shutdown()
    elapsed = statistics.median(runs)
    return {"calls_per_s": ASYNC_CALLS / elapsed, "elapsed_s": elapsed,
            "vs_bound": elapsed / ASYNC_LOWER_BOUND_S, "vs_bare": elapsed / statistics.median(bare)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    executors = ["thread", "process"] + ([] if args.skip_ray else ["ray"])
    print(f"load average at start: {os.getloadavg()}")
    print("composition: two-stage chain vs one direct call (median of interleaved rounds)")
    for executor in executors:
        row = composition(executor, args.rounds)
        print(f"  {executor:8s} direct {row['direct_s'] * 1e6:9.0f} us   chain {row['chain_s'] * 1e6:9.0f} us"
              f"   chain/direct {row['ratio']:.2f}x")
    print(f"async: {ASYNC_CALLS} concurrent asyncio.sleep({NAP_S}) calls, max_concurrent_queries={ASYNC_CONCURRENCY}")
    for executor in ["thread"] + ([] if args.skip_ray else ["ray"]):
        row = async_throughput(executor, max(3, args.rounds // 2))
        print(f"  {executor:8s} {row['calls_per_s']:8.0f} calls/s   {row['elapsed_s']:.3f} s"
              f"   = {row['vs_bound']:.2f}x the {ASYNC_LOWER_BOUND_S:.1f} s lower bound,"
              f" {row['vs_bare']:.2f}x a bare loop's")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()

"""Async replica throughput: ``python -m bench.bench_async [--rounds N] [--executors thread process]``.

1,000 calls of an ``async def`` backend that awaits ``asyncio.sleep(0.01)``, all submitted at
once through a handle, on **one** replica with ``max_concurrent_queries=100``. The floor is
the same 1,000 sleeps on a bare event loop, 100 at a time (an ``asyncio.Semaphore``), measured
in the same run: the ratio is what the serve layer (queue, dispatch, hand-off to the
replica's loop and back) costs on top of the concurrency itself. The ceiling both approach
is 1,000 / 100 x 0.01 s = 0.1 s, i.e. 10,000 calls/s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from serve_core import BackendConfig, Serve

CALLS = 1000
CONCURRENCY = 100
SLEEP_S = 0.01


def _sleeper() -> Any:
    async def sleeper() -> None:
        await asyncio.sleep(SLEEP_S)

    return sleeper


def bare_loop() -> float:
    """Seconds for the calls on a bare loop, ``CONCURRENCY`` at a time."""

    async def main() -> float:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one() -> None:
            async with gate:
                await asyncio.sleep(SLEEP_S)

        started = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(CALLS)])
        return time.perf_counter() - started

    return asyncio.run(main())


def through_serve(srv: Serve) -> float:
    """Seconds for the calls through a handle on ``srv``'s one replica."""
    handle = srv.get_handle("sleep")
    started = time.perf_counter()
    futures = [handle.remote() for _ in range(CALLS)]
    for future in futures:
        future.result(60)
    return time.perf_counter() - started


def deploy(executor: str) -> Serve:
    srv = Serve(executor=executor, start_server=False)
    srv.create_endpoint("sleep")
    config = BackendConfig(max_concurrent_queries=CONCURRENCY, max_queue_size=CALLS * 2)
    srv.create_backend(_sleeper(), "sleep:v1", backend_config=config)
    srv.link("sleep", "sleep:v1")
    srv.get_handle("sleep").remote().result(60)  # warm: a worker's first imports are not measured
    return srv


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--executors", nargs="+", default=["thread", "process"])
    args = parser.parse_args(argv)
    bare = [bare_loop() for _ in range(args.rounds)]
    floor = statistics.median(bare)
    print(f"{'subject':<48}{'seconds':>10}{'calls/s':>10}{'ratio':>8}")
    print(f"{'bare loop, 100 at a time':<48}{floor:>10.3f}{CALLS / floor:>10.0f}{1.0:>8.2f}")
    for executor in args.executors:
        srv = deploy(executor)
        try:
            runs = []
            for _ in range(args.rounds):
                runs.append(through_serve(srv))
                bare.append(bare_loop())  # interleaved: both sides see the same load
            seconds = statistics.median(runs)
            floor = statistics.median(bare)
        finally:
            srv.shutdown()
        label = f"{executor}: 1 replica, max_concurrent_queries=100"
        print(f"{label:<48}{seconds:>10.3f}{CALLS / seconds:>10.0f}{seconds / floor:>8.2f}")
    ceiling = CONCURRENCY / SLEEP_S
    print(f"ceiling: {ceiling:.0f} calls/s; one at a time: {1 / SLEEP_S:.0f} calls/s")


if __name__ == "__main__":
    main()

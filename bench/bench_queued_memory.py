"""Memory per queued request: ``python -m bench.bench_queued_memory [--queued N]``.

One replica (thread executor) holds a call that waits on an event, and ``N`` (default
100,000) handle calls queue behind it, each with one small keyword argument. Reported: the
bytes Python allocated per queued call (``tracemalloc``: the future, the query, its queue
entry, the kwargs dict, what the caller keeps), against a baseline measured the same way in
the same run: as many bare ``concurrent.futures.Future`` objects. Issue 16's target is at
most 1 KiB per queued call. Then the event is set and every call is checked answered.
"""

from __future__ import annotations

import argparse
import os
import threading
import tracemalloc
from concurrent.futures import Future
from typing import Any

from serve_core import BackendConfig, Serve

from .core_cases import WAIT, settle


def per_item(make: Any, count: int) -> tuple[float, list[Any]]:
    """Bytes allocated per ``make()`` (kept alive), and what it made."""
    tracemalloc.start()
    start = tracemalloc.get_traced_memory()[0]
    kept = [make() for _ in range(count)]
    used = tracemalloc.get_traced_memory()[0] - start
    tracemalloc.stop()
    return used / count, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queued", type=int, default=100_000)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    release = threading.Event()
    entered = threading.Event()

    def backend(request: Any, n: int = 0) -> int:
        entered.set()
        release.wait(WAIT)
        return n

    bare, futures = per_item(Future, args.queued)
    del futures
    with Serve(executor="thread", start_server=False, metrics=True) as srv:
        srv.create_endpoint("held", None)
        srv.create_backend(backend, "held:v1", backend_config=BackendConfig(max_queue_size=args.queued + 1))
        srv.link("held", "held:v1")
        remote = srv.get_handle("held").remote
        first = remote(n=-1)
        if not entered.wait(WAIT):
            raise TimeoutError("the replica did not take the first call")
        counter = iter(range(args.queued))
        ours, queued = per_item(lambda: remote(n=next(counter)), args.queued)
        release.set()
        settle([first, *queued])
        if [future.result() for future in queued] != list(range(args.queued)):
            raise AssertionError("a queued call got another call's answer")
    print(f"{args.queued:,} queued calls: {ours:,.0f} B per call; a bare Future {bare:,.0f} B ({ours / bare:.2f}x)")
    print(f"load average (1 min) {load:.2f}")


if __name__ == "__main__":
    main()

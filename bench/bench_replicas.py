"""Replicas that scale: ``python -m bench.bench_replicas [--rounds N]``.

Throughput of handle calls on the thread executor, driven two ways: ``burst``, 4,096 put in
flight at once from one thread, then waited for (the queue is deep, so the serving path is
what is measured); ``64 callers``, 64 threads each making blocking calls one after the other
(4,096 in all: at most 64 in flight, every call a hand-off between threads). Three instances
side by side, measured in interleaved rounds:

* ``noop x1``: a no-op backend, one replica (the baseline of both ratios);
* ``noop x100``: the same backend with 100 replicas (issue 16's target: >= 0.95x of x1);
* ``io x100``: a backend that sleeps 1 ms (I/O: the GIL is free) with 100 replicas, whose
  ceiling is 100,000 calls/s, so the serving path bounds it (target: >= 0.9x of noop x1).

Printed: calls/s of each (median of rounds) and the median of the per-round ratios; then the
process CPU time (all threads) per call and its ratio, noop x1's over each case's (so that
above 1 is cheaper), which other processes' load skews far less.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from serve_core import BackendConfig, Serve

from .core_cases import WAIT

CALLS = 4096
IO_S = 0.001
CALLERS = 64


def noop(request: Any) -> None:
    return None


def io_call(request: Any) -> None:
    time.sleep(IO_S)


def deploy(srv: Serve, target: Callable[[Any], None], replicas: int) -> Callable[..., Any]:
    srv.create_endpoint("work", None)
    srv.create_backend(target, "work:v1", backend_config=BackendConfig(num_replicas=replicas, max_queue_size=2 * CALLS))
    srv.link("work", "work:v1")
    remote = srv.get_handle("work").remote
    collect([remote() for _ in range(CALLS)])  # warm up
    return remote


def collect(futures: list[Any]) -> list[Any]:
    """Every call's answer, read as a caller would (bounded waits)."""
    return [future.result(WAIT) for future in futures]


def burst(remote: Callable[..., Any]) -> None:
    collect([remote() for _ in range(CALLS)])


def callers(remote: Callable[..., Any], threads: int = CALLERS) -> None:
    def work() -> None:
        for _ in range(CALLS // threads):
            remote().result(WAIT)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(WAIT)


def timed(run: Callable[[], None]) -> tuple[float, float]:
    """Calls/s and process CPU microseconds (all threads) per call of ``run()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return CALLS / (time.perf_counter() - wall), (time.process_time() - cpu) / CALLS * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (median reported)")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    cases = {"noop x1": (noop, 1), "noop x100": (noop, 100), "io x100": (io_call, 100)}
    instances = {name: Serve(executor="thread", start_server=False) for name in cases}
    try:
        remotes = {name: deploy(instances[name], *cases[name]) for name in cases}
        names = list(cases)
        print(f"{'drive':<11} {'case':<10} {'calls/s':>9} {'against noop x1':>16} {'CPU/call':>10} {'CPU ratio':>10}")
        for drive_name, drive in (("burst", burst), ("64 callers", callers)):
            samples: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
            for index in range(args.rounds):
                for name in names[index % len(names) :] + names[: index % len(names)]:  # rotate the order
                    samples[name].append(timed(partial(drive, remotes[name])))
            base = samples["noop x1"]
            for name in names:
                ratio = statistics.median(s[0] / b[0] for s, b in zip(samples[name], base))
                cpu = statistics.median(b[1] / s[1] for s, b in zip(samples[name], base))  # as a throughput ratio
                print(
                    f"{drive_name:<11} {name:<10} {statistics.median(s[0] for s in samples[name]):9,.0f} "
                    f"{ratio:15.2f}x {statistics.median(s[1] for s in samples[name]):7.1f} us {cpu:9.2f}x"
                )
    finally:
        for srv in instances.values():
            srv.shutdown()
    print(f"load average (1 min) {load:.2f} before, {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()

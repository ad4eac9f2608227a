"""Recovery time of the process executor per crash kind (Ray's: ``bench/bench_ray.py --recoveries``).

Usage::

    python bench/recovery.py [--rounds 5]

One replica; a crash (SIGKILL from outside, or ``os._exit`` inside a call), then calls until one
is answered by the replacement. Reports the time from the crash to that answer (median / worst).
Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import time
from typing import Any

import serve_core as serve
from serve_core.errors import ServeError

WAIT = 60.0


def backend(*, crash: bool = False) -> int:
    if crash:
        os._exit(3)
    return os.getpid()


def _first_answer_after(handle: Any, old_pid: int) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < WAIT:
        try:
            if handle.remote().result(WAIT) != old_pid:
                return time.perf_counter() - start
        except ServeError:
            continue  # the call met the dead replica: the next one goes to the replacement
    raise TimeoutError("no replacement answered")


def measure(kind: str, rounds: int) -> list[float]:
    times = []
    with serve.Serve(start_server=False, executor="process") as srv:
        srv.create_endpoint("ep")
        srv.create_backend(backend, "b")
        srv.link("ep", "b")
        handle = srv.get_handle("ep")
        for _ in range(rounds):
            pid = handle.remote().result(WAIT)
            if kind == "sigkill":
                os.kill(pid, signal.SIGKILL)
            else:
                try:
                    handle.remote(crash=True).result(WAIT)
                except ServeError:
                    pass
            times.append(_first_answer_after(handle, pid))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()}")
    for kind in ("sigkill", "exit-in-call"):
        times = measure(kind, args.rounds)
        print(f"process, {kind:13} median {statistics.median(times) * 1000:.0f} ms, worst {max(times) * 1000:.0f} ms")
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()

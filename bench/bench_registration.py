"""Registering N endpoints and backends: does the time grow linearly with N?

Run from the repository root::

    python -m bench.bench_registration [--sizes 1000 10000] [--stores memory sqlite] [--rounds 3]

Each measurement starts a fresh process (so no run inherits another's heap), builds a
``Serve`` on the inline executor (no replica threads: the registry is what is measured)
with the store named, and times ``create_endpoint`` + ``create_backend`` + ``link`` for N
pairs, one after the other. Rounds are interleaved (every store and size once per round);
the table shows the median per size, the cost per registration, and the ratio
``t(largest) / t(smallest)``: linear growth makes it the ratio of the sizes (10 for
1,000 → 10,000); a per-change cost that grows with the registry makes it larger.

``--profile STORE N`` runs one size under cProfile instead and prints where the time goes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any


def noop(request: Any = None) -> None:
    return None


def register(store: str, n: int) -> float:
    """Seconds to register ``n`` endpoint+backend pairs on a fresh instance over ``store``."""
    from serve_core import Serve

    with tempfile.TemporaryDirectory() as tmp:
        path = None if store == "memory" else os.path.join(tmp, "registry.db")
        srv = Serve(kv_store_path=path, start_server=False, executor="inline")
        try:
            start = time.perf_counter()
            for i in range(n):
                srv.create_endpoint(f"e{i}", f"/e{i}")
                srv.create_backend(noop, f"b{i}")
                srv.link(f"e{i}", f"b{i}")
            return time.perf_counter() - start
        finally:
            srv.shutdown()


def _in_child(store: str, n: int) -> float:
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-m", "bench.bench_registration", "--one", store, str(n)],
        capture_output=True, text=True, check=True, env=env,
    )
    return float(done.stdout.split()[-1])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--stores", nargs="+", default=["memory", "sqlite"], choices=["memory", "sqlite"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("STORE", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--profile", nargs=2, metavar=("STORE", "N"), help="profile one size")
    args = parser.parse_args(argv)
    if args.one:
        print(register(args.one[0], int(args.one[1])))
        return
    if args.profile:
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.runcall(register, args.profile[0], int(args.profile[1]))
        pstats.Stats(profile).sort_stats("cumulative").print_stats(30)
        return
    times: dict[tuple[str, int], list[float]] = {(s, n): [] for s in args.stores for n in args.sizes}
    for _ in range(args.rounds):
        for key in times:
            times[key].append(_in_child(*key))
    load = os.getloadavg()
    print(f"registering N endpoints + backends, inline executor; median of {args.rounds} interleaved rounds")
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    small, large = min(args.sizes), max(args.sizes)
    for store in args.stores:
        medians = {n: statistics.median(times[store, n]) for n in args.sizes}
        cells = "   ".join(f"N={n:,}: {medians[n]:7.2f} s ({medians[n] / n * 1e6:5.0f} µs each)" for n in args.sizes)
        ratio = medians[large] / medians[small]
        print(f"{store:7s} {cells}   t({large:,})/t({small:,}) = {ratio:5.1f} (linear: {large / small:g})")


if __name__ == "__main__":
    main()

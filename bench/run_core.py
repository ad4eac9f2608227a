"""Interleaved core benchmark: ``python -m bench.run_core [--rounds N]``.

Runs each (subject, baseline) pair of ``test_bench_core.py`` alternately, round by
round, and prints the median of the per-round ratios. Interleaving makes both sides
see the same machine load, so the ratio holds steady even when other work runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from serve_core import Serve

from . import core_cases as cases

Pair = tuple[str, Callable[[], None], Callable[[], None], int, float | None]


def _timed(func: Callable[[], None], loops: int) -> float:
    start = time.perf_counter()
    for _ in range(loops):
        func()
    return (time.perf_counter() - start) / loops


def measure(subject: Callable[[], None], baseline: Callable[[], None], loops: int, rounds: int) -> tuple[
    float, float, float
]:
    """Median per-call seconds of subject and baseline, and the median per-round ratio."""
    subj, base, ratios = [], [], []
    for index in range(rounds):
        first, second = (subject, baseline) if index % 2 else (baseline, subject)
        a, b = _timed(first, loops), _timed(second, loops)
        s, t = (a, b) if first is subject else (b, a)
        subj.append(s)
        base.append(t)
        ratios.append(s / t)
    return statistics.median(subj), statistics.median(base), statistics.median(ratios)


def _unit(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:8.2f} ms"
    if seconds >= 1e-6:
        return f"{seconds * 1e6:8.2f} us"
    return f"{seconds * 1e9:8.1f} ns"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=60, help="interleaved rounds per pair")
    args = parser.parse_args()
    with (
        Serve(executor="thread", start_server=False) as threaded,
        Serve(executor="inline", start_server=False) as inline,
        ThreadPoolExecutor(1) as pool,
    ):
        thread_handle = cases.noop_handle(threaded)
        inline_handle = cases.noop_handle(inline)
        cases.warm_pool(pool)
        pairs: list[Pair] = [
            ("(a) thread handle round trip / bare thread hand-off",
             partial(cases.handle_round_trip, thread_handle), partial(cases.bare_round_trip, pool), 100, 3.0),
            (f"(b) {cases.IN_FLIGHT} in flight, thread handle / bare pool",
             partial(cases.handle_burst, thread_handle), partial(cases.bare_burst, pool), 1, None),
            ("(c) inline handle round trip / plain call",
             partial(cases.handle_round_trip, inline_handle), cases.plain_call, 200, None),
        ]
        print(f"{'pair':<56} {'subject':>11} {'baseline':>11} {'ratio':>8}")
        for name, subject, baseline, loops, target in pairs:
            measure(subject, baseline, loops, 3)  # warm-up
            subj, base, ratio = measure(subject, baseline, loops, args.rounds)
            note = "" if target is None else f"  target {target:g}x {'met' if ratio <= target else 'MISSED'}"
            print(f"{name:<56} {_unit(subj)} {_unit(base)} {ratio:7.2f}x{note}")


if __name__ == "__main__":
    main()

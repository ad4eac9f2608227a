"""Interleaved core benchmark: ``python -m bench.run_core [--rounds N]``.

Runs each (subject, baseline) pair of ``test_bench_core.py`` alternately, round by
round, and prints medians of the per-round ratios. Interleaving makes both sides see
the same machine load. Two ratios are printed:

* ``wall``: elapsed time, what a caller waits (the target applies to this one);
* ``cpu``: CPU time of the whole process (all threads) per call, which preemption by
  other processes does not inflate: the steadier measure of the work the serve layer
  adds, on a busy machine.

It also counts the function calls of one inline request (a work measure that no load
can skew).

Pairs (d) and (e) compare the handle round trip with the Prometheus metrics recorded (the
default, ``Serve(metrics=True)``) against the same instance kind with ``metrics=False``
(issue 13's target: at most 1.05x). ``--only d e`` runs just those.

A thread hand-off is dominated by how fast the OS wakes a thread on the *other* core, which
on a small VM varies from run to run (a bare hand-off measured 20 to 60 µs here, idle or
loaded). ``--pin CPU`` runs everything on one CPU, which removes that noise and leaves the
work each side does; report both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from serve_core import Serve

from . import core_cases as cases

Pair = tuple[str, Callable[[], None], Callable[[], None], int, float | None]


def _timed(func: Callable[[], None], loops: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(loops):
        func()
    return (time.perf_counter() - wall) / loops, (time.process_time() - cpu) / loops


def measure(
    subject: Callable[[], None], baseline: Callable[[], None], loops: int, rounds: int
) -> dict[str, float]:
    """Median per-call wall seconds of both sides, and median per-round wall and CPU ratios."""
    subj, base, wall_ratios, cpu_ratios = [], [], [], []
    for index in range(rounds):
        if index % 2:
            (s_wall, s_cpu), (b_wall, b_cpu) = _timed(subject, loops), _timed(baseline, loops)
        else:
            (b_wall, b_cpu), (s_wall, s_cpu) = _timed(baseline, loops), _timed(subject, loops)
        subj.append(s_wall)
        base.append(b_wall)
        wall_ratios.append(s_wall / b_wall)
        if b_cpu > 0:
            cpu_ratios.append(s_cpu / b_cpu)
    return {
        "subject": statistics.median(subj),
        "baseline": statistics.median(base),
        "wall": statistics.median(wall_ratios),
        "cpu": statistics.median(cpu_ratios) if cpu_ratios else float("nan"),
    }


def calls_per_request(call: Callable[[], None], loops: int = 200) -> tuple[float, float]:
    """Python-level and C-level function calls per ``call()`` in this thread: a load-proof work count."""
    counts = {"call": 0, "c_call": 0}

    def profile(frame: object, event: str, arg: object) -> None:
        if event in counts:
            counts[event] += 1

    sys.setprofile(profile)
    try:
        for _ in range(loops):
            call()
    finally:
        sys.setprofile(None)
    return counts["call"] / loops, counts["c_call"] / loops


def _unit(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:8.2f} ms"
    if seconds >= 1e-6:
        return f"{seconds * 1e6:8.2f} us"
    return f"{seconds * 1e9:8.1f} ns"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=60, help="interleaved rounds per pair")
    parser.add_argument(
        "--pin", type=int, metavar="CPU", help="run on this CPU only (no cross-core wake-ups; see below)"
    )
    parser.add_argument("--only", nargs="+", metavar="LETTER", help="run only these pairs, e.g. --only d e")
    args = parser.parse_args()
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})  # threads started from now on inherit it
    with (
        Serve(executor="thread", start_server=False) as threaded,
        Serve(executor="inline", start_server=False) as inline,
        Serve(executor="thread", start_server=False, metrics=False) as threaded_off,
        Serve(executor="inline", start_server=False, metrics=False) as inline_off,
        ThreadPoolExecutor(1) as pool,
    ):
        thread_handle = cases.noop_handle(threaded)
        inline_handle = cases.noop_handle(inline)
        thread_off, inline_off_handle = cases.noop_handle(threaded_off), cases.noop_handle(inline_off)
        cases.warm_pool(pool)
        pairs: list[Pair] = [
            (
                "(a) thread handle round trip / bare thread hand-off",
                partial(cases.handle_round_trip, thread_handle),
                partial(cases.bare_round_trip, pool),
                100,
                3.0,
            ),
            (
                f"(b) {cases.IN_FLIGHT} in flight, thread handle / bare pool",
                partial(cases.handle_burst, thread_handle),
                partial(cases.bare_burst, pool),
                1,
                None,
            ),
            (
                "(c) inline handle round trip / plain call",
                partial(cases.handle_round_trip, inline_handle),
                cases.plain_call,
                1000,
                None,
            ),
            (
                "(d) thread handle, metrics on / metrics off",
                partial(cases.handle_round_trip, thread_handle),
                partial(cases.handle_round_trip, thread_off),
                100,
                1.05,
            ),
            (
                "(e) inline handle, metrics on / metrics off",
                partial(cases.handle_round_trip, inline_handle),
                partial(cases.handle_round_trip, inline_off_handle),
                1000,
                1.05,
            ),
        ]
        if args.only:
            pairs = [pair for pair in pairs if pair[0][1] in args.only]
        print(f"{'pair':<56} {'subject':>11} {'baseline':>11} {'wall':>9} {'cpu':>9}")
        for name, subject, baseline, loops, target in pairs:
            measure(subject, baseline, loops, 3)  # warm-up
            m = measure(subject, baseline, loops, args.rounds)
            note = ""
            if target is not None:
                note = f"  target {target:g}x {'met' if m['wall'] <= target else 'MISSED'}"
            print(
                f"{name:<56} {_unit(m['subject'])} {_unit(m['baseline'])} "
                f"{m['wall']:8.2f}x {m['cpu']:8.2f}x{note}"
            )
        python_calls, c_calls = calls_per_request(partial(cases.handle_round_trip, inline_handle))
        print(f"function calls per inline request: {python_calls:.0f} Python, {c_calls:.0f} C")
        python_off, c_off = calls_per_request(partial(cases.handle_round_trip, inline_off_handle))
        print(f"  with metrics=False: {python_off:.0f} Python, {c_off:.0f} C")


if __name__ == "__main__":
    main()

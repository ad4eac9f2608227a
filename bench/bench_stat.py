"""``stat()`` off the hot path: ``python -m bench.bench_stat [--rounds N]``.

A backend's four histograms (latency_s, queue_wait_s, execution_s, batch_size) are
filled with a full 3,600 s window at 130 samples a second (synthetic times), then:

(a) the work ``stat()`` does under the router's lock: ``snapshot(now)`` of the four
    (shared sealed buckets, a copy of the open one), against the old approach, which
    copied every bucket of the longest window;
(b) the aggregation after the lock: ``percentile_keys`` over windows (10, 60, 300, 600,
    3600) and percentiles (50, 90, 95), against the old approach, which concatenated
    each window separately from per-bucket views;
(c) what a hot-path thread waits while ``stat()`` runs in a loop: it takes the lock and
    records four samples, as the router does for each answer (the lock and the GIL
    are both contended, as in the real thing).

The old approach is re-implemented below (``_OldHistogram``, ``_old_percentile_keys``)
so both sides run in the same process on the same data; rounds alternate between them
so both see the same machine load. Only the ratios mean something.

(d) end to end: a ``Serve`` on a fake clock whose no-op backend holds a full hour of
    samples (filled by real handle calls); handle calls from another thread while
    ``Serve.stat()`` loops, and ``stat()``'s own duration.

(c) and (d) are measured by ``contention(stat_once, hot_call, stats)``.

(e) a million samples: one histogram holding 1,000,000 samples in its hour (278 a second),
    ``stat()``'s aggregation of it (``snapshot`` + ``percentile_keys``, every default window
    and percentile), and a backend's four such histograms (what ``Serve.stat()`` does for a
    backend that answered a million calls in the hour), against the floor: one
    ``np.percentile`` of the same million values, already in one array (rounds interleaved).
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import statistics
import threading
import time
from array import array
from collections.abc import Callable, Sequence

import numpy as np

from serve_core import Serve
from serve_core.metrics import HistogramSnapshot, WindowedHistogram, percentile_keys
from serve_core.testing import FakeClock

from . import core_cases as cases

NAMES = ("latency_s", "queue_wait_s", "execution_s", "batch_size")
WINDOW_S = 3600
RATE = 130  # samples per second and histogram
WINDOWS = (10, 60, 300, 600, 3600)
PERCENTILES = (50, 90, 95)
NOW = 100_000.0  # synthetic monotonic time at the end of the filled window


class _OldHistogram:
    """The histogram before the change: a deque of buckets, copied bucket by bucket by ``snapshot``."""

    def __init__(self, gc_window_seconds: float) -> None:
        self.gc_window_seconds = gc_window_seconds
        self.buckets: collections.deque[tuple[int, array[float]]] = collections.deque()

    def record(self, value: float, now: float) -> None:
        second = int(now)
        if not self.buckets or self.buckets[-1][0] != second:
            self.buckets.append((second, array("d")))
            horizon = now - self.gc_window_seconds
            while self.buckets and self.buckets[0][0] + 1 <= horizon:
                self.buckets.popleft()
        self.buckets[-1][1].append(value)  # the bench stays below the reservoir's capacity

    def snapshot(self, seconds: float, now: float) -> _OldHistogram:
        copy = _OldHistogram(self.gc_window_seconds)
        start = now - seconds
        copy.buckets.extend((s, array("d", samples)) for s, samples in self.buckets if s + 1 > start)
        return copy

    def window(self, seconds: float, now: float) -> np.ndarray:
        start = now - seconds
        chunks = [samples for s, samples in self.buckets if s + 1 > start]
        if not chunks:
            return np.empty(0)
        return np.concatenate([np.frombuffer(c, dtype=np.float64) for c in chunks])


def _old_percentile_keys(
    name: str, hist: _OldHistogram, percentiles: Sequence[float], windows: Sequence[float], now: float
) -> dict[str, float]:
    out: dict[str, float] = {}
    for window in windows:
        samples = hist.window(window, now)
        if samples.size:
            for pct, value in zip(percentiles, np.percentile(samples, percentiles)):
                out[f"{name}_{pct}th_perc_{window}_window"] = float(value)
    return out


class _Backend:
    """The histogram set of one backend in both versions, filled with the same samples."""

    def __init__(self, seed: int = 0) -> None:
        self.lock = threading.Lock()
        self.new = {name: WindowedHistogram(WINDOW_S) for name in NAMES}
        self.old = {name: _OldHistogram(WINDOW_S) for name in NAMES}
        rng = random.Random(seed)
        for second in range(int(NOW) - WINDOW_S, int(NOW)):
            for k in range(RATE):
                when = second + k / RATE
                for name in NAMES:
                    value = float(rng.randint(1, 8)) if name == "batch_size" else rng.lognormvariate(-4, 1)
                    self.new[name].record(value, when)
                    self.old[name].record(value, when)

    def snapshot_new(self, now: float) -> dict[str, HistogramSnapshot]:
        with self.lock:
            return {name: hist.snapshot(now) for name, hist in self.new.items()}

    def snapshot_old(self, now: float) -> dict[str, _OldHistogram]:
        with self.lock:
            return {name: hist.snapshot(max(WINDOWS), now) for name, hist in self.old.items()}

    def stat_new(self, now: float = NOW) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, snap in self.snapshot_new(now).items():
            out.update(percentile_keys(f"b_{name}", snap, PERCENTILES, WINDOWS, now))
        return out

    def stat_old(self, now: float = NOW) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, copy in self.snapshot_old(now).items():
            out.update(_old_percentile_keys(f"b_{name}", copy, PERCENTILES, WINDOWS, now))
        return out

    def hot_call(self) -> None:
        """What the router does under its lock for each answer: record four samples."""
        with self.lock:
            for hist in self.new.values():
                hist.record(0.001, NOW)
            for old in self.old.values():
                old.record(0.001, NOW)


def _timed(func: Callable[[], object]) -> float:
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def interleaved(new: Callable[[], object], old: Callable[[], object], rounds: int) -> tuple[list[float], list[float]]:
    """Seconds per call of both sides, alternating which goes first."""
    new_times, old_times = [], []
    for index in range(rounds):
        if index % 2:
            new_times.append(_timed(new))
            old_times.append(_timed(old))
        else:
            old_times.append(_timed(old))
            new_times.append(_timed(new))
    return new_times, old_times


def contention(stat_once: Callable[[], object], hot_call: Callable[[], object], stats: int) -> list[float]:
    """Latencies of ``hot_call`` made every ~0.5 ms from another thread while ``stat_once`` runs ``stats`` times.

    The hook for the end-to-end row: pass ``srv.stat`` and ``lambda: handle.remote().result()``.
    """
    latencies: list[float] = []
    done = threading.Event()

    def caller() -> None:
        while not done.is_set():
            latencies.append(_timed(hot_call))
            time.sleep(0.0005)

    thread = threading.Thread(target=caller, name="hot-path")
    thread.start()
    try:
        for _ in range(stats):
            stat_once()
    finally:
        done.set()
        thread.join(timeout=60)
    return latencies


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.3f} ms"


def _row(label: str, new: list[float], old: list[float]) -> None:
    new_med, old_med = statistics.median(new), statistics.median(old)
    print(
        f"{label:<34} new {_ms(new_med)} (max {_ms(max(new))})   old {_ms(old_med)} (max {_ms(max(old))})"
        f"   old/new {old_med / new_med:8.1f}x"
    )


def _quantile(values: list[float], q: float) -> float:
    return float(np.quantile(values, q)) if values else float("nan")


def report_stat(backend: _Backend, rounds: int) -> None:
    """Rows (a), (b) and their sum: the new and the old version, rounds interleaved."""
    print(f"{len(NAMES)} histograms, windows {WINDOWS}, percentiles {PERCENTILES}; median (max) of rounds")
    snap_new, snap_old = (lambda: backend.snapshot_new(NOW)), (lambda: backend.snapshot_old(NOW))
    _row("(a) snapshot under the lock", *interleaved(snap_new, snap_old, rounds * 10))
    new_snaps, old_snaps = snap_new(), snap_old()

    def aggregate_new() -> None:
        for name, snap in new_snaps.items():
            percentile_keys(name, snap, PERCENTILES, WINDOWS, NOW)

    def aggregate_old() -> None:
        for name, copy in old_snaps.items():
            _old_percentile_keys(name, copy, PERCENTILES, WINDOWS, NOW)

    _row("(b) percentiles after the lock", *interleaved(aggregate_new, aggregate_old, rounds))
    _row("    stat() in all: (a) + (b)", *interleaved(backend.stat_new, backend.stat_old, rounds))


def report_contention(backend: _Backend, rounds: int) -> None:
    """Row (c): the hot-path thread's latency with no stat(), the new one and the old one looping."""
    print("(c) a hot-path call (lock + 4 records) every 0.5 ms while stat() loops; its latency:")
    for label, stat_once in (
        ("no stat() running", lambda: time.sleep(0.05)),
        ("new stat()", backend.stat_new),
        ("old stat()", backend.stat_old),
    ):
        lat = contention(stat_once, backend.hot_call, rounds)
        print(
            f"    {label:<20} median {_ms(statistics.median(lat))}   p99 {_ms(_quantile(lat, 0.99))}"
            f"   max {_ms(max(lat))}   ({len(lat)} calls)"
        )


def report_end_to_end(rounds: int) -> None:
    """Row (d): handle calls on a ``Serve`` whose no-op backend holds a full hour of samples.

    The window is filled through the public API on a fake clock (130 calls, then one
    second), then a thread makes handle calls while the main thread loops ``Serve.stat()``
    with its default windows, against the same calls with no ``stat()`` running.
    """
    clock = FakeClock()
    with Serve(executor="thread", start_server=False, clock=clock) as srv:
        handle = cases.noop_handle(srv)
        start = time.perf_counter()
        for _ in range(WINDOW_S):
            cases.settle([handle.remote() for _ in range(RATE)])
            clock.advance(1.0)
        print(f"(d) filled one backend by {WINDOW_S * RATE:,} handle calls in {time.perf_counter() - start:.1f} s;")
        print("    a handle call every 0.5 ms while Serve.stat() loops; its latency:")
        durations: list[float] = []
        for label, stat_once in (
            ("no stat() running", lambda: time.sleep(0.05)),
            ("Serve.stat()", lambda: durations.append(_timed(srv.stat))),
        ):
            lat = contention(stat_once, lambda: handle.remote().result(cases.WAIT), rounds)
            print(
                f"    {label:<20} median {_ms(statistics.median(lat))}   p99 {_ms(_quantile(lat, 0.99))}"
                f"   max {_ms(max(lat))}   ({len(lat)} calls)"
            )
        print(f"    Serve.stat() itself: median {_ms(statistics.median(durations))}   max {_ms(max(durations))}")


def report_million(rounds: int, samples: int = 1_000_000) -> None:
    """Row (e): ``stat()`` over a million samples against one ``np.percentile`` of them."""
    rate = samples // WINDOW_S
    values = np.random.default_rng(0).lognormal(-4, 1, rate * WINDOW_S)
    hists = [WindowedHistogram(WINDOW_S) for _ in NAMES]
    for index, value in enumerate(values.tolist()):
        when = NOW - WINDOW_S + index / rate
        for hist in hists:
            hist.record(value, when)
    flat = hists[0].window(WINDOW_S, NOW)

    def one() -> None:
        percentile_keys("x", hists[0].snapshot(NOW), PERCENTILES, WINDOWS, NOW)

    def backend() -> None:
        for name, hist in zip(NAMES, hists):
            percentile_keys(name, hist.snapshot(NOW), PERCENTILES, WINDOWS, NOW)

    def floor() -> None:
        np.percentile(flat, PERCENTILES)

    times: dict[str, list[float]] = {"one": [], "backend": [], "floor": []}
    for index in range(rounds):
        order = [("one", one), ("backend", backend), ("floor", floor)]
        for key, func in order if index % 2 else order[::-1]:
            times[key].append(_timed(func))
    base = statistics.median(times["floor"])
    print(f"(e) {flat.size:,} samples in one histogram's window; median of {rounds} interleaved rounds")
    print(f"    np.percentile of them, one array (floor)  {_ms(base)}")
    for key, label in (("one", "stat() of that histogram"), ("backend", "stat() of a backend: 4 such")):
        median = statistics.median(times[key])
        print(f"    {label:<38} {_ms(median)}   {median / base:5.2f}x the floor")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="rounds of each stat() measurement")
    parser.add_argument("--no-end-to-end", action="store_true", help="skip row (d) (it fills a Serve: ~30 s)")
    parser.add_argument("--million", action="store_true", help="only row (e), a million samples")
    args = parser.parse_args(argv)
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.million:
        report_million(args.rounds)
        return
    start = time.perf_counter()
    backend = _Backend()
    samples = sum(len(hist.window(WINDOW_S, NOW)) for hist in backend.new.values())
    print(f"filled {len(NAMES)} histograms, {samples:,} samples in all, in {time.perf_counter() - start:.1f} s")
    new_keys, old_keys = backend.stat_new(), backend.stat_old()
    if new_keys.keys() != old_keys.keys() or not all(np.isclose(new_keys[k], old_keys[k]) for k in new_keys):
        raise SystemExit("the new and the old version disagree on the percentiles")
    print()
    report_stat(backend, args.rounds)
    print()
    report_contention(backend, args.rounds)
    print()
    report_million(args.rounds)
    if not args.no_end_to_end:
        print()
        report_end_to_end(args.rounds)


if __name__ == "__main__":
    main()

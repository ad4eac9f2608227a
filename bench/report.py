"""The benchmark report: ``python -m bench.report [--quick] [--out DIR] [--only SECTION ...]``.

Runs a subset of the benchmarks and writes ``REPORT.md`` with PNG plots (matplotlib, the
``bench`` extra) into ``--out`` (default ``bench/report``):

* ``http``: requests/s and p99 against concurrency, our no-op endpoint and a bare WSGI hello
  world on each server (Werkzeug's, Granian's), measured alternately (:mod:`bench.http_load`);
* ``core``: a handle round trip against its floor on each executor (a plain call, a bare
  thread hand-off, a bare one-worker process pool), rounds interleaved (:mod:`bench.run_core`);
* ``batching``: throughput against ``max_batch_size`` for a backend with a fixed cost per call,
  next to the ideal that cost model gives;
* ``replicas``: throughput against ``num_replicas``: I/O-bound calls on the thread executor,
  and (full run) CPU-bound calls on the process executor.

The header names the machine's cores, its load before and after, and the package versions.
``--quick`` (about a minute with ``http``, seconds without) uses fewer points and shorter
rounds: its numbers are noisier, but the curves have the same shape. Only ratios measured in
the same run mean anything on a shared machine. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from serve_core import BackendConfig, Serve, accept_batch

from . import core_cases as cases
from . import run_core

BENCH = Path(__file__).resolve().parent
SECTIONS = ("http", "core", "batching", "replicas")
PACKAGES = ("serve-core", "werkzeug", "granian", "sqlalchemy", "numpy", "cloudpickle", "matplotlib")
WAIT = 120.0  # seconds: the bound on every wait

CALL_S = 0.002  # the batching backend's fixed cost per call (a model's per-call overhead)
ITEM_S = 0.0001  # ... and its cost per item of a batch
IO_CALL_S = 0.005  # the replicas section's I/O-bound call (sleeps: the GIL is free)
CPU_LOOPS = 100_000  # the CPU-bound call: pure Python, a few ms


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much to measure."""

    http_concurrency: tuple[int, ...]
    http_duration_s: float
    http_rounds: int
    core_rounds: int
    batch_sizes: tuple[int, ...]
    batch_queries: int
    replica_counts: tuple[int, ...]
    replica_queries: int
    cpu_bound: bool


QUICK = Plan((1, 8, 32), 1.0, 1, 5, (1, 4, 16), 240, (1, 2, 4), 120, False)
FULL = Plan((1, 2, 4, 8, 16, 32, 64), 3.0, 3, 30, (1, 2, 4, 8, 16, 32), 1600, (1, 2, 4, 8), 480, True)


@dataclasses.dataclass
class Section:
    title: str
    body: str
    plots: list[str] = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------ header
def header(plan: Plan, load_before: tuple[float, float, float], load_after: tuple[float, float, float]) -> str:
    versions = ", ".join(f"{name} {_version(name)}" for name in PACKAGES)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return "\n".join([
        "# Benchmark report",
        "",
        f"- generated {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} by `python -m bench.report"
        f"{' --quick' if plan is QUICK else ''}` at commit `{_commit()}`",
        f"- machine: {platform.machine()}, {cores} usable cores of {os.cpu_count()}, {platform.system()} "
        f"{platform.release()}; Python {platform.python_version()}",
        f"- load average (1/5/15 min): before {_load(load_before)}, after {_load(load_after)}"
        " (the benchmarks' own load included; other processes on a shared machine skew absolute numbers)",
        f"- packages: {versions}",
        f"- HTTP load generator: {'wrk' if shutil.which('wrk') else 'the Python client of bench/http_load.py'}",
        "",
    ])


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH, capture_output=True, text=True)
    except OSError:
        return "?"
    return out.stdout.strip() or "?"


def _load(values: tuple[float, float, float]) -> str:
    return " / ".join(f"{value:.2f}" for value in values)


# ------------------------------------------------------------------ plotting
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    _pyplot().close(fig)
    return name


# ------------------------------------------------------------------ http
def http_section(plan: Plan, out: Path) -> Section:
    from . import http_load

    servers = ["werkzeug"] + (["granian"] if _version("granian") != "(not installed)" else [])
    results = {
        server: http_load.measure(server, list(plan.http_concurrency), plan.http_duration_s, 32, plan.http_rounds)
        for server in servers
    }
    plt = _pyplot()
    fig, (rps_ax, p99_ax) = plt.subplots(1, 2, figsize=(10, 4))
    rows = ["| server | concurrency | bare req/s | serve no-op req/s | ratio | bare p99 ms | serve p99 ms | errors |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for server, by_app in results.items():
        color = {"werkzeug": "#4e79a7", "granian": "#f28e2b"}.get(server)
        for app, style in (("bare", "--"), ("serve", "-")):  # one colour per server, dashed: the bare app
            points = by_app[app]
            label = f"{server}: {'bare WSGI' if app == 'bare' else 'serve no-op'}"
            rps, p99 = [r.rps for r in points.values()], [r.p99_ms for r in points.values()]
            for ax, values in ((rps_ax, rps), (p99_ax, p99)):
                ax.plot(list(points), values, style, marker="o", color=color, label=label)
        for c, bare in by_app["bare"].items():
            ours = by_app["serve"][c]
            rows.append(
                f"| {server} | {c} | {bare.rps:,.0f} | {ours.rps:,.0f} | {ours.rps / bare.rps:.0%} "
                f"| {bare.p99_ms:.2f} | {ours.p99_ms:.2f} | {bare.errors + ours.errors} |"
            )
    for ax, label in ((rps_ax, "requests/s"), (p99_ax, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(plan.http_concurrency), [str(c) for c in plan.http_concurrency])
        ax.set_xlabel("concurrent connections")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    p99_ax.set_yscale("log")
    rps_ax.legend(fontsize=8)
    body = (
        f"Each server runs our no-op endpoint (`bench/noop_app.py`, thread executor, one replica) and a bare "
        f"WSGI hello world in separate processes on 127.0.0.1, loaded alternately: {plan.http_rounds} round(s) "
        f"of {plan.http_duration_s:g} s per point, the median kept.\n\n" + "\n".join(rows)
    )
    return Section("HTTP: requests/s and p99 against concurrency", body, [_save(fig, out, "http.png")])


# ------------------------------------------------------------------ core
def _noop_process() -> None:
    """The bare process pool's task (module level: the standard pickler sends it by name)."""


def _floors(pools: dict[str, Any]) -> dict[str, tuple[str, Callable[[], None]]]:
    return {
        "inline": ("a plain function call", cases.plain_call),
        "thread": ("a bare thread hand-off (`ThreadPoolExecutor(1)`)", partial(cases.bare_round_trip, pools["thread"])),
        "process": (
            "a bare process round trip (`ProcessPoolExecutor(1)`)",
            lambda: pools["process"].submit(_noop_process).result(WAIT),
        ),
    }


def core_section(plan: Plan, out: Path) -> Section:
    loops = {"inline": 1000, "thread": 100, "process": 50}
    measured: dict[str, dict[str, float]] = {}
    names: dict[str, str] = {}
    with ThreadPoolExecutor(1) as threads, ProcessPoolExecutor(1) as processes:
        cases.warm_pool(threads)
        processes.submit(_noop_process).result(WAIT)
        floors = _floors({"thread": threads, "process": processes})
        for executor, (name, floor) in floors.items():
            with Serve(executor=executor, start_server=False) as srv:
                handle = cases.noop_handle(srv)
                subject = partial(cases.handle_round_trip, handle)
                run_core.measure(subject, floor, loops[executor], 2)  # warm-up
                measured[executor] = run_core.measure(subject, floor, loops[executor], plan.core_rounds)
                names[executor] = name
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    executors = list(measured)
    xs = range(len(executors))
    ours = [measured[e]["subject"] * 1e6 for e in executors]
    floor_us = [measured[e]["baseline"] * 1e6 for e in executors]
    ax.bar([x - 0.2 for x in xs], floor_us, width=0.4, label="floor", color="#bab0ac")
    ax.bar([x + 0.2 for x in xs], ours, width=0.4, label="handle.remote().result()", color="#4e79a7")
    ax.set_xticks(list(xs), executors)
    ax.set_yscale("log")
    ax.set_ylabel("µs per call (median of rounds)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    rows = ["| executor | floor | floor µs | handle round trip µs | ratio (wall) | ratio (CPU) |",
            "| --- | --- | ---: | ---: | ---: | ---: |"]
    for executor in executors:
        m = measured[executor]
        rows.append(
            f"| {executor} | {names[executor]} | {m['baseline'] * 1e6:.2f} | {m['subject'] * 1e6:.2f} "
            f"| {m['wall']:.2f}x | {m['cpu']:.2f}x |"
        )
    body = (
        f"A no-op backend called through a handle, one call at a time, against the bare floor of the same "
        f"executor, {plan.core_rounds} interleaved rounds (`bench/run_core.py`'s method); ratios are medians of "
        "per-round ratios.\n\n" + "\n".join(rows)
    )
    return Section("Handle round trip against the floors, per executor", body, [_save(fig, out, "core.png")])


# ------------------------------------------------------------------ throughput helpers
def _throughput(srv: Serve, endpoint: str, queries: int) -> float:
    """Queries/s of ``queries`` calls put in flight at once through a handle."""
    handle = srv.get_handle(endpoint)
    cases.settle([handle.remote() for _ in range(min(queries, 20))])  # warm
    start = time.perf_counter()
    futures: list[Future[Any]] = [handle.remote() for _ in range(queries)]
    cases.settle(futures)
    return queries / (time.perf_counter() - start)


@accept_batch
def _model(requests: list[Any]) -> list[None]:
    """A model with a fixed cost per call and a small one per item: what batching amortises."""
    time.sleep(CALL_S + ITEM_S * len(requests))
    return [None] * len(requests)


def _io_call(request: Any) -> None:
    time.sleep(IO_CALL_S)


def _cpu_call(request: Any) -> int:
    total = 0
    for i in range(CPU_LOOPS):
        total += i * i
    return total


# ------------------------------------------------------------------ batching
def batching_section(plan: Plan, out: Path) -> Section:
    measured: dict[int, float] = {}
    with Serve(executor="thread", start_server=False) as srv:
        srv.create_endpoint("model", None)
        srv.create_backend(_model, "model:v1", backend_config=BackendConfig(max_batch_size=plan.batch_sizes[0]))
        srv.link("model", "model:v1")
        for size in plan.batch_sizes:
            config = BackendConfig(max_batch_size=size, max_queue_size=plan.batch_queries * 2)
            srv.set_backend_config("model:v1", config)
            measured[size] = _throughput(srv, "model", plan.batch_queries)
    ideal = {size: size / (CALL_S + ITEM_S * size) for size in plan.batch_sizes}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(list(ideal), list(ideal.values()), "--", color="#bab0ac", label="ideal: size / (call + size × item)")
    ax.plot(list(measured), list(measured.values()), "-o", color="#4e79a7", label="measured (1 replica, thread)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(plan.batch_sizes), [str(size) for size in plan.batch_sizes])
    ax.set_xlabel("max_batch_size")
    ax.set_ylabel("queries/s")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    rows = ["| max_batch_size | queries/s | ideal | of ideal |", "| ---: | ---: | ---: | ---: |"]
    rows += [
        f"| {size} | {measured[size]:,.0f} | {ideal[size]:,.0f} | {measured[size] / ideal[size]:.0%} |"
        for size in plan.batch_sizes
    ]
    body = (
        f"One replica of an `@accept_batch` backend that sleeps {CALL_S * 1e3:g} ms per call plus "
        f"{ITEM_S * 1e3:g} ms per item; {plan.batch_queries} handle calls put in flight at once (a free replica "
        "takes what is queued, up to `max_batch_size`).\n\n" + "\n".join(rows)
    )
    return Section("Batching: throughput against batch size", body, [_save(fig, out, "batching.png")])


# ------------------------------------------------------------------ replicas
def _replica_curve(executor: str, target: Callable[..., Any], counts: Sequence[int], queries: int) -> dict[int, float]:
    measured: dict[int, float] = {}
    with Serve(executor=executor, start_server=False) as srv:
        srv.create_endpoint("work", None)
        srv.create_backend(target, "work:v1", backend_config=BackendConfig(num_replicas=counts[0]))
        srv.link("work", "work:v1")
        for count in counts:
            srv.set_backend_config("work:v1", BackendConfig(num_replicas=count, max_queue_size=queries * 2))
            measured[count] = _throughput(srv, "work", queries)
    return measured


def replicas_section(plan: Plan, out: Path) -> Section:
    queries = plan.replica_queries
    curves = {"I/O-bound, thread executor": _replica_curve("thread", _io_call, plan.replica_counts, queries)}
    if plan.cpu_bound:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        counts = tuple(sorted({1, 2, cores}))
        curves["CPU-bound, process executor"] = _replica_curve("process", _cpu_call, counts, queries // 4)
        curves["CPU-bound, thread executor (GIL)"] = _replica_curve("thread", _cpu_call, counts, queries // 4)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    rows = ["| workload | replicas | queries/s | against 1 replica |", "| --- | ---: | ---: | ---: |"]
    for label, points in curves.items():
        first = points[min(points)]
        ax.plot(list(points), [value / first for value in points.values()], "-o", label=label)
        rows += [f"| {label} | {n} | {value:,.0f} | {value / first:.2f}x |" for n, value in points.items()]
    top = max(max(points) for points in curves.values())
    ax.plot([1, top], [1, top], "--", color="#bab0ac", label="linear")
    ax.set_xticks(sorted({n for points in curves.values() for n in points}))
    ax.set_xlabel("num_replicas")
    ax.set_ylabel("throughput against 1 replica")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    body = (
        f"Handle calls in flight at once ({plan.replica_queries} I/O-bound ones that sleep {IO_CALL_S * 1e3:g} ms; "
        f"CPU-bound ones run {CPU_LOOPS:,} Python loop iterations), one call per replica at a time.\n\n"
        + "\n".join(rows)
    )
    return Section("Throughput against replica count", body, [_save(fig, out, "replicas.png")])


# ------------------------------------------------------------------ main
RUNNERS: dict[str, Callable[[Plan, Path], Section]] = {
    "http": http_section,
    "core": core_section,
    "batching": batching_section,
    "replicas": replicas_section,
}


def write_report(plan: Plan, out: Path, sections: Sequence[str]) -> Path:
    """Run ``sections`` and write ``out/REPORT.md`` with its plots; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    before = os.getloadavg()
    done: list[Section] = []
    for name in sections:
        print(f"bench.report: {name}…", file=sys.stderr, flush=True)
        started = time.perf_counter()
        section = RUNNERS[name](plan, out)
        section.body += f"\n\n({name}: {time.perf_counter() - started:.0f} s)"
        done.append(section)
    parts = [header(plan, before, os.getloadavg())]
    for section in done:
        parts.append(f"## {section.title}\n")
        parts += [f"![{section.title}]({plot})\n" for plot in section.plots]
        parts.append(section.body + "\n")
    report = out / "REPORT.md"
    report.write_text("\n".join(parts), encoding="utf-8")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer points and shorter rounds")
    parser.add_argument("--out", type=Path, default=BENCH / "report", help="folder of REPORT.md and its plots")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="SECTION",
                        help=f"sections to run, of {', '.join(SECTIONS)} (default: all)")
    args = parser.parse_args(argv)
    report = write_report(QUICK if args.quick else FULL, args.out, args.only)
    print(f"bench.report: wrote {report}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

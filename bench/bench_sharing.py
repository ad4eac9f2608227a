"""Shared-registry benchmarks: how fast a change spreads, and what the watcher costs a call.

Usage::

    python bench/bench_sharing.py                       # both parts, SQLite (+ PostgreSQL if reachable)
    python bench/bench_sharing.py --splits 30 --postgres postgresql+psycopg://postgres@127.0.0.1/test
    python bench/bench_sharing.py --no-propagation      # the watcher's cost only

(a) Propagation: 4 serving processes on one store; this process makes ``--splits`` splits,
    each time waiting until all 4 report the new revision; the delay is from the commit's
    return to each process applying it (p50/p99 over all samples). SQLite is seen by polling
    (default interval 250 ms); PostgreSQL also notifies (LISTEN/NOTIFY).
(b) Watcher cost: a handle round trip on an instance whose watcher polls a memory store at the
    default interval, against one whose watcher never polls within the run (interval 1 h),
    measured alternately in the same run; the ratio is reported. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

SERVERS = 4
WAIT = 60.0

SERVER = """
import json, sys, threading, time
import serve_core as serve
srv = serve.Serve(kv_store_path=sys.argv[1], start_server=False, executor="inline")
print("READY", flush=True)
seen = srv.revision
stop = threading.Event()
def report():
    global seen
    while not stop.is_set():
        if srv.revision != seen:
            seen = srv.revision
            print("APPLIED", seen, time.time(), flush=True)
        stop.wait(0.0005)
threading.Thread(target=report, daemon=True).start()
sys.stdin.readline()
stop.set()
srv.shutdown()
"""


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * (len(ordered) - 1))))]


def propagation(url: str, splits: int) -> dict[str, float]:
    """Delays (ms) from a split's commit to each of the serving processes applying it."""
    import serve_core as serve

    writer = serve.Serve(kv_store_path=url, start_server=False, executor="inline")
    writer.create_endpoint("ep")
    writer.create_backend(lambda request: "a", "a")
    writer.create_backend(lambda request: "b", "b")
    writer.link("ep", "a")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen([sys.executable, "-c", SERVER, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env=env)
        for _ in range(SERVERS)
    ]
    delays: list[float] = []
    try:
        for proc in procs:
            _expect(proc, "READY")
        for i in range(splits):
            weights = {"a": 1.0, "b": 0.0} if i % 2 else {"a": 0.0, "b": 1.0}
            writer.split("ep", weights)
            committed, revision = time.time(), writer.revision
            for proc in procs:
                while True:
                    _, rev, at = _expect(proc, "APPLIED").split()
                    if int(rev) >= revision:
                        delays.append((float(at) - committed) * 1000)
                        break
    finally:
        for proc in procs:
            if proc.poll() is None and proc.stdin is not None:
                proc.stdin.write("\n")
                proc.stdin.flush()
            proc.wait(WAIT)
        writer.shutdown()
    return {"p50_ms": _percentile(delays, 50), "p99_ms": _percentile(delays, 99), "samples": len(delays)}


def _expect(proc: subprocess.Popen[str], word: str) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"server exited before {word}")
        if line.startswith(word):
            return line.strip()
    raise TimeoutError(word)


def watcher_cost(rounds: int, calls: int) -> dict[str, float]:
    """Median handle round trip (µs) with the watcher polling at the default interval, and with none."""
    from core_cases import handle_round_trip, noop_handle

    import serve_core as serve

    polling = serve.Serve(start_server=False, executor="thread")  # default registry_poll_s (0.25 s)
    quiet = serve.Serve(start_server=False, executor="thread", registry_poll_s=3600)
    handles = {"polling": noop_handle(polling), "quiet": noop_handle(quiet)}
    times: dict[str, list[float]] = {name: [] for name in handles}
    try:
        for _ in range(rounds):
            for name, handle in handles.items():  # alternately, so load changes hit both
                start = time.perf_counter()
                for _ in range(calls):
                    handle_round_trip(handle)
                times[name].append((time.perf_counter() - start) / calls * 1e6)
    finally:
        polling.shutdown()
        quiet.shutdown()
    med = {name: statistics.median(values) for name, values in times.items()}
    return {"polling_us": med["polling"], "quiet_us": med["quiet"], "ratio": med["polling"] / med["quiet"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--splits", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--postgres", default=os.environ.get("SERVE_CORE_TEST_POSTGRES_URL"))
    parser.add_argument("--no-propagation", action="store_true")
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()}", flush=True)
    results: dict[str, object] = {}
    if not args.no_propagation:
        with tempfile.TemporaryDirectory() as folder:
            results["sqlite"] = propagation(f"sqlite:///{folder}/bench.db", args.splits)
            print("propagation, SQLite:", json.dumps(results["sqlite"]), flush=True)
        if args.postgres:
            os.environ.setdefault("SERVE_CORE_SECRET", "bench-sharing-secret-0123456789")
            with _fresh_schema(args.postgres) as url:
                results["postgres"] = propagation(url, args.splits)
            print("propagation, PostgreSQL:", json.dumps(results["postgres"]), flush=True)
    results["watcher"] = watcher_cost(args.rounds, args.calls)
    print("watcher cost:", json.dumps(results["watcher"]), flush=True)
    print(f"load average: {os.getloadavg()}", flush=True)


@contextlib.contextmanager
def _fresh_schema(base: str) -> Iterator[str]:
    """A URL on a schema of its own (dropped after), so no other registry is touched."""
    import sqlalchemy as sa

    schema = f"serve_core_bench_{os.getpid()}"
    engine = sa.create_engine(base)
    with engine.begin() as conn:
        conn.execute(sa.schema.CreateSchema(schema))
    try:
        yield sa.make_url(base).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(False)
    finally:
        with engine.begin() as conn:
            conn.execute(sa.schema.DropSchema(schema, cascade=True))
        engine.dispose()


if __name__ == "__main__":
    main()

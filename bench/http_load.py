"""HTTP load benchmark: our no-op endpoint vs a bare WSGI hello world on the same server.

Usage::

    python bench/http_load.py                    # both servers, concurrency 1/8/32
    python bench/http_load.py --servers werkzeug --duration 3

Each server runs in its own process (started by this script) on 127.0.0.1; the load comes
from ``wrk`` in another process (``apt-get install wrk``), or, without it, from a small
keep-alive client in this script's worker processes. Reports requests/s, p50/p99 latency
and errors (summed over rounds), and the ratio ours/bare measured in the same run: both
servers run side by side and are measured alternately, the median of ``--rounds`` kept.
Also the CPU time the server's processes used per request (``/proc``, all threads), whose
ratio bare/ours other processes' load skews far less than requests/s.
Not a test: speed is not asserted anywhere.

``--compare observability`` measures the no-op endpoint with metrics, access log and request
ids on against the same build with them off (``noop_factory.py``), the same way; the ratio
printed is the time per request, on / off (issue 13's target: at most 1.15x under Granian at
c=8). ``--interface rsgi`` serves ours through Granian's RSGI interface, as ``serve-core run
--server granian`` does (the bare baseline stays the WSGI hello world on Granian's WSGI
interface, the issue 16 baseline).
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SERVER_CODE = {
    # Both apps on Werkzeug's threaded server with serve_core's handler (no per-request log).
    "werkzeug": """
import signal, sys, threading
sys.path[:0] = [{repo!r}, {bench!r}]
from serve_core.http.server import HTTPServer
if {app!r} == "bare":
    from hello_wsgi import app
    server = HTTPServer(app, "127.0.0.1", {port})
elif {app!r}.startswith("obs-"):
    import os
    os.environ["BENCH_OBSERVABILITY"] = {app!r}[4:].split("#")[0]
    from noop_factory import app
    server = HTTPServer(app(), "127.0.0.1", {port})
else:
    import runpy, serve_core as serve
    serve.init(start_server=False, executor="thread", debug=False)
    runpy.run_path({noop!r})
    server = HTTPServer(serve.wsgi_app(), "127.0.0.1", {port})
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
print("ready", flush=True)
stop.wait()
server.close()
""",
    "granian": """
import os, sys
sys.path[:0] = [{repo!r}, {bench!r}]
from granian import Granian
from granian.constants import Interfaces
if {app!r} == "bare":
    target, factory = "hello_wsgi:app", False
elif {app!r}.startswith("obs-"):
    os.environ["BENCH_OBSERVABILITY"] = {app!r}[4:].split("#")[0]
    target, factory = "noop_factory:" + ("rsgi_app" if {interface!r} == "rsgi" else "app"), True
else:
    os.environ["SERVE_CORE_APP"] = {noop!r}
    factory_name = "rsgi_app_from_env" if {interface!r} == "rsgi" else "app_from_env"
    target, factory = "serve_core.http.granian:" + factory_name, True
print("ready", flush=True)
if {interface!r} == "rsgi" and {app!r} != "bare":  # RSGI runs on Granian's event loop thread
    interface, threads = Interfaces.RSGI, {{}}
else:
    interface, threads = Interfaces.WSGI, {{"blocking_threads": {threads}}}
Granian(target, address="127.0.0.1", port={port}, interface=interface, factory=factory,
        workers=1, log_enabled=False, **threads).serve()
""",
}
PATHS = {"bare": "/", "serve": "/noop"}
COMPARISONS = {  # what is measured against what: baseline first
    "bare": {"bare": "/", "serve": "/noop"},
    "observability": {"obs-off": "/noop", "obs-on": "/noop"},
}


@dataclasses.dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    rounds: list[float] = dataclasses.field(default_factory=list)  # requests/s of each round, in order
    cpu_us: float = math.nan  # CPU time of the server's processes per request, microseconds
    cpu_rounds: list[float] = dataclasses.field(default_factory=list)  # cpu_us of each round, in order


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_answering(port: int, path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                conn.close()
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not answer {path}")


def start_server(
    server: str, app: str, port: int, threads: int, access_log: str = os.devnull, interface: str = "wsgi"
) -> subprocess.Popen[bytes]:
    code = SERVER_CODE[server].format(
        repo=str(REPO), bench=str(BENCH), app=app, port=port, noop=str(BENCH / "noop_app.py"), threads=threads,
        interface=interface,
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(BENCH)]), BENCH_ACCESS_LOG=access_log)
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    number, unit = match.groups()
    return float(number) * _UNITS[unit]


def run_wrk(url: str, concurrency: int, duration: float) -> Result:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    errors = sum(
        int(n) for n in re.findall(r"(?:Non-2xx or 3xx responses|connect|read|write|timeout) ?:? (\d+)", out)
    )
    return Result(rps, p50, p99, errors)


def _client(port: int, path: str, duration: float, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    conn = http.client.HTTPConnection("127.0.0.1", port)
    latencies: list[float] = []
    errors = 0
    end = time.monotonic() + duration
    while (start := time.monotonic()) < end:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        errors += response.status != 200
        latencies.append(time.monotonic() - start)
    queue.put((latencies, errors))


def run_python_client(port: int, path: str, concurrency: int, duration: float) -> Result:
    """Fallback load generator: ``concurrency`` keep-alive connections in worker processes."""
    queue: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    procs = [
        multiprocessing.Process(target=_client, args=(port, path, duration, queue))
        for _ in range(concurrency)
    ]
    for proc in procs:
        proc.start()
    results = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
    latencies = sorted(x for lat, _ in results for x in lat)
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3  # noqa: E731
    return Result(len(latencies) / duration, pick(0.5), pick(0.99), sum(e for _, e in results))


def _load(port: int, path: str, concurrency: int, duration: float) -> Result:
    if shutil.which("wrk"):
        return run_wrk(f"http://127.0.0.1:{port}{path}", concurrency, duration)
    return run_python_client(port, path, concurrency, duration)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` and its descendants (Linux /proc)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += times.get(current, 0.0)
        todo += [child for child, parent in parents.items() if parent == current]
    return total


def _load_with_cpu(pid: int, port: int, path: str, concurrency: int, duration: float) -> Result:
    """:func:`_load`, and the server's CPU time per request during it (steadier than req/s under load)."""
    before = tree_cpu_s(pid) if os.path.isdir("/proc") else math.nan
    result = _load(port, path, concurrency, duration)
    used = tree_cpu_s(pid) - before if os.path.isdir("/proc") else math.nan
    result.cpu_us = used / max(1.0, result.rps * max(1, round(duration))) * 1e6
    return result


def measure(
    server: str, concurrencies: list[int], duration: float, threads: int, rounds: int,
    paths: dict[str, str] = PATHS, access_log: str = os.devnull, interface: str = "wsgi",
) -> dict[str, dict[int, Result]]:
    """Both apps on ``server`` (both processes up), measured alternately; median of rounds."""
    ports = {app: free_port() for app in paths}
    procs = {app: start_server(server, app, ports[app], threads, access_log, interface) for app in paths}
    try:
        for app in paths:
            wait_answering(ports[app], paths[app])
        out: dict[str, dict[int, Result]] = {app: {} for app in paths}
        for concurrency in concurrencies:
            samples: dict[str, list[Result]] = {app: [] for app in paths}
            for index in range(rounds):  # alternate, so background load hits both alike
                for app in (paths if index % 2 == 0 else reversed(list(paths))):
                    samples[app].append(_load_with_cpu(procs[app].pid, ports[app], paths[app], concurrency, duration))
            for app in paths:
                ranked = sorted(samples[app], key=lambda r: r.rps)
                median = ranked[len(ranked) // 2]
                median.errors = sum(r.errors for r in ranked)
                median.rounds = [r.rps for r in samples[app]]
                median.cpu_rounds = [r.cpu_us for r in samples[app]]
                out[app][concurrency] = median
        return out
    finally:
        for proc in procs.values():
            stop_server(proc)


def report(server: str, bare: dict[int, Result], ours: dict[int, Result]) -> None:
    print(
        f"\n{server}: concurrency | bare req/s p50 p99 err | serve no-op req/s p50 p99 err | ratio "
        "(of medians; median of rounds' ratios) | CPU per request bare, ours: bare/ours"
    )
    for c in bare:
        b, o = bare[c], ours[c]
        ratios = sorted(x / y for x, y in zip(o.rounds, b.rounds))  # the two sides of a round ran back to back
        cpu = sorted(y / x for x, y in zip(o.cpu_rounds, b.cpu_rounds))
        print(
            f"  c={c:<3} | {b.rps:9.0f} {b.p50_ms:6.2f}ms {b.p99_ms:6.2f}ms {b.errors:3d} "
            f"| {o.rps:9.0f} {o.p50_ms:6.2f}ms {o.p99_ms:6.2f}ms {o.errors:3d} | {o.rps / b.rps:5.1%}; "
            f"{ratios[len(ratios) // 2]:5.1%} | {statistics.median(b.cpu_rounds):5.1f} us, "
            f"{statistics.median(o.cpu_rounds):5.1f} us: {cpu[len(cpu) // 2]:5.1%}"
        )
        print(f"        rounds' ratios: {' '.join(f'{r:.3f}' for r in ratios)}")


def report_observability(server: str, off: dict[int, Result], on: dict[int, Result]) -> None:
    print(
        f"\n{server}: concurrency | off req/s p50 p99 err | on req/s p50 p99 err | time per request on/off: "
        "median of rounds' ratios (ratio of medians)"
    )
    for c in off:
        f, o = off[c], on[c]
        ratios = sorted(a / b for a, b in zip(f.rounds, o.rounds))  # the two sides of a round ran back to back
        print(
            f"  c={c:<3} | {f.rps:9.0f} {f.p50_ms:6.2f}ms {f.p99_ms:6.2f}ms {f.errors:3d} "
            f"| {o.rps:9.0f} {o.p50_ms:6.2f}ms {o.p99_ms:6.2f}ms {o.errors:3d} "
            f"| {ratios[len(ratios) // 2]:5.3f}x ({f.rps / o.rps:5.3f}x)"
        )
        print(f"        rounds' ratios: {' '.join(f'{r:.2f}' for r in ratios)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", nargs="+", default=["werkzeug", "granian"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median reported)")
    parser.add_argument("--granian-threads", type=int, default=32, help="Granian blocking threads")
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="bare", help="what against what")
    parser.add_argument(
        "--interface", choices=("wsgi", "rsgi"), default="wsgi",
        help="Granian's interface for --compare observability (rsgi: what serve-core run --server granian serves)",
    )
    args = parser.parse_args()
    print(
        f"load generator: {'wrk' if shutil.which('wrk') else 'python keep-alive client'}; "
        f"{os.cpu_count()} CPUs; {args.duration} s per point"
    )
    paths = COMPARISONS[args.compare]
    for server in args.servers:
        before = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as scratch:
            access_log = os.path.join(scratch, "access.log")  # the "on" side writes its access log here
            results = measure(
                server, args.concurrency, args.duration, args.granian_threads, args.rounds, paths, access_log,
                args.interface,
            )
        if args.compare == "observability":
            report_observability(server, results["obs-off"], results["obs-on"])
        else:
            report(server, results["bare"], results["serve"])
        print(f"  load average (1 min) {before:.2f} before, {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()

"""The long run: about 1,000,000 requests at 32 connections on each server, errors and RSS before/after.

Usage::

    python bench/http_million.py [--requests 1000000] [--servers werkzeug granian]

Starts ``serve-core run bench/noop_app.py`` on a free port for each server (in-memory store),
warms it, reads the serving process's RSS (for Granian: the sum over its processes), runs
``wrk -t1 -c32`` long enough for ``--requests`` at the rate measured in a 3 s probe, and reads
the RSS again. Reports requests, non-2xx/socket errors and RSS. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rss_kb(pid: int) -> int:
    """RSS of ``pid`` and its descendants, in KiB (from /proc)."""
    total, pending = 0, [pid]
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rpartition(")")[2].split()[1]), []).append(int(entry))
    while pending:
        current = pending.pop()
        pending.extend(children.get(current, []))
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        match = re.search(r"VmRSS:\s+(\d+)", status)
        total += int(match.group(1)) if match else 0
    return total


def _wrk(url: str, seconds: float) -> tuple[int, int, float]:
    """(requests, errors, requests/s) of one wrk run."""
    out = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{max(1, round(seconds))}s", url], capture_output=True, text=True, check=True
    ).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return requests, errors + (int(non2xx.group(1)) if non2xx else 0), rate


def run(server: str, total: int) -> None:
    port = _free_port()
    command = [sys.executable, "-m", "serve_core.cli", "run", str(BENCH / "noop_app.py"), "--port", str(port),
               "--kv-store", ":memory:", "--server", server]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    url = f"http://127.0.0.1:{port}/noop"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)  # polling the server's start under a deadline
        _, _, rate = _wrk(url, 3)  # warm-up and rate probe
        before = _rss_kb(proc.pid)
        requests, errors, rate = _wrk(url, total / rate)
        after = _rss_kb(proc.pid)
        print(f"{server:9} {requests:>9,} requests  errors {errors}  {rate:,.0f} req/s  "
              f"RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--servers", nargs="+", default=["werkzeug", "granian"])
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk")
    print(f"load average: {os.getloadavg()}", flush=True)
    for server in args.servers:
        run(server, args.requests)
    print(f"load average: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()

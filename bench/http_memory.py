"""Does the standalone server's memory hold still over many requests? RSS and tracemalloc snapshots.

Usage::

    python bench/http_memory.py                                   # 500,000 requests, 32 connections
    python bench/http_memory.py --requests 200000 --every 20000 --gc-window 60
    python bench/http_memory.py --no-tracemalloc                  # RSS only, at full speed

The server (our no-op endpoint, thread executor, one replica) runs in this process on
127.0.0.1; the load comes from ``--connections`` keep-alive connections in worker
processes, in rounds of ``--every`` requests, each round on new connections (so
connection turnover is part of it). After every round the script prints the requests
served, RSS, the bytes tracemalloc traces, the threads, and the lines whose allocations
grew most since the first round (after warm-up). ``--gc-window`` is the instance's
``gc_window_seconds`` (how long stat() keeps latency samples; default 3600 as in
``serve.init``): with a shorter window the metrics' share levels off within the run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import sys
import threading
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REQUEST = b"GET /noop HTTP/1.1\r\nHost: bench\r\n\r\n"


def _load(port: int, count: int) -> int:
    """``count`` requests on one keep-alive connection; the number answered 200."""
    ok = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        buffer = b""
        for _ in range(count):
            sock.sendall(REQUEST)
            while b"\r\n\r\n" not in buffer:
                buffer += sock.recv(65536)
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            while len(buffer) < length:
                buffer += sock.recv(65536)
            buffer = buffer[length:]
            ok += head.startswith(b"HTTP/1.1 200 ")
    return ok


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _filtered(snapshot: tracemalloc.Snapshot) -> tracemalloc.Snapshot:
    ignored = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen*")]
    return snapshot.filter_traces(ignored)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500_000)
    parser.add_argument("--every", type=int, default=50_000, help="requests per round (a snapshot after each)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--gc-window", type=float, default=3600.0, help="the instance's gc_window_seconds")
    parser.add_argument("--top", type=int, default=6, help="lines of allocation growth to print per round")
    parser.add_argument("--no-tracemalloc", action="store_true")
    args = parser.parse_args()

    import serve_core as serve
    from serve_core.http.server import HTTPServer

    if not args.no_tracemalloc:
        tracemalloc.start(1)
    srv = serve.Serve(start_server=False, executor="thread", gc_window_seconds=args.gc_window)
    srv.create_endpoint("noop", "/noop")
    srv.create_backend(lambda request: "ok", "noop:v1")
    srv.link("noop", "noop:v1")
    server = HTTPServer(srv.wsgi_app(), "127.0.0.1", 0)
    per_connection = max(1, args.every // args.connections)
    served, base = 0, None
    began = time.monotonic()
    print(f"pid {os.getpid()}, tracemalloc {'off' if args.no_tracemalloc else 'on'}, gc_window {args.gc_window} s")
    with multiprocessing.get_context("spawn").Pool(args.connections) as pool:
        for _ in range(max(1, args.requests // (args.connections * per_connection))):
            answered = sum(pool.starmap(_load, [(server.port, per_connection)] * args.connections))
            served += args.connections * per_connection
            line = f"{served:>9,} requests ({answered:,} ok in this round)  {time.monotonic() - began:7.1f} s  "
            line += f"RSS {_rss_mb():7.1f} MB  threads {threading.active_count():3}"
            if args.no_tracemalloc:
                print(line, flush=True)
                continue
            snapshot = _filtered(tracemalloc.take_snapshot())
            traced = sum(stat.size for stat in snapshot.statistics("filename"))
            print(f"{line}  traced {traced / 2**20:7.2f} MB", flush=True)
            if base is None:
                base = snapshot  # after the first round: imports, threads and caches are warm
                continue
            for stat in snapshot.compare_to(base, "lineno")[: args.top]:
                frame = stat.traceback[0]
                where = f"{Path(frame.filename).name}:{frame.lineno}"
                print(f"    {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+8} blocks  {where}", flush=True)
    server.close()
    srv.shutdown()


if __name__ == "__main__":
    main()

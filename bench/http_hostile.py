"""Hostile clients against a server: is a normal request still answered, and how fast?

Usage::

    python bench/http_hostile.py                          # Werkzeug, every attack, 1,000 connections
    python bench/http_hostile.py --servers werkzeug granian --attacks slowloris idle stalled
    python bench/http_hostile.py --max-connections 2000   # a thread for every connection, no eviction

The server runs in its own process on 127.0.0.1 (our standalone server through
``serve-core run``, or Granian with ``--server granian``), serving ``/noop`` and ``/echo``
(which reads the body). This process opens the attack's connections, then sends a normal
``GET /noop`` on a new connection every 0.2 s for ``--duration`` seconds and reports its
latency (p50, max), statuses and failures, and what became of the attack's connections.

Attacks:

* ``slowloris``: ``--connections`` connections each send a request head one byte at a time,
  one byte per connection per second; a connection the server closes is opened again.
* ``idle``: ``--connections`` connections each make one request, then stay open, silent.
* ``silent``: ``--connections`` connections that connect and send nothing.
* ``stalled``: ``--stalled`` connections (default 64) send ``POST /echo`` with
  ``Content-Length: 100`` and 5 bytes of body, then nothing.

Every wait is bounded; nothing here asserts speed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import resource
import select
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
APP = """
import serve_core as serve

serve.create_endpoint("noop", "/noop")
serve.create_backend(lambda request: "ok", "noop:v1")
serve.link("noop", "noop:v1")
serve.create_endpoint("echo", "/echo", methods=["POST"])
serve.create_backend(lambda request: bytes(request.get_data()), "echo:v1")
serve.link("echo", "echo:v1")
"""
# Our server with a connection cap other than the default (serve-core run has no option for it).
WERKZEUG = """
import runpy, signal, sys, threading
import serve_core as serve
from serve_core.http.server import HTTPServer
serve.init(start_server=False, executor="thread")
runpy.run_path(sys.argv[1])
server = HTTPServer(serve.wsgi_app(), "127.0.0.1", int(sys.argv[2]), max_connections=int(sys.argv[3]))
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
print("ready", flush=True)
stop.wait()
server.close()
serve.shutdown()
"""
HEAD = b"GET /noop HTTP/1.1\r\nHost: bench\r\nX-Padding: " + b"x" * 64 + b"\r\n\r\n"
STALLED = b"POST /echo HTTP/1.1\r\nHost: bench\r\nContent-Length: 100\r\n\r\nhello"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(port: int, timeout: float = 10.0) -> int:
    """One normal request on a new connection: its status."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"GET /noop HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        reply = b""
        while b"\r\n" not in reply and (data := sock.recv(4096)):
            reply += data
        return int(reply.split()[1]) if reply.startswith(b"HTTP/") else 0


@contextlib.contextmanager
def server(kind: str, max_connections: int) -> Iterator[tuple[int, int]]:
    """Start the server in its own process; yields its port and pid once it answers."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as folder:
        app = Path(folder, "app.py")
        app.write_text(textwrap.dedent(APP))
        env = dict(os.environ, PYTHONPATH=str(REPO))
        if kind == "granian":
            command = [sys.executable, "-m", "serve_core.cli", "run", str(app), "--server", "granian"]
            command += ["--port", str(port), "--kv-store", str(Path(folder, "s.db"))]
        else:
            command = [sys.executable, "-c", WERKZEUG, str(app), str(port), str(max_connections)]
        proc = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if _get(port) == 200:
                        break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"{kind} server did not start") from None
                    time.sleep(0.1)  # polling for the server to listen, bounded
            yield port, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)


@dataclasses.dataclass
class Attack:
    """Connections held open against the server, kept up by :meth:`tick`."""

    port: int
    kind: str
    count: int
    sockets: dict[socket.socket, int] = dataclasses.field(default_factory=dict)  # socket -> bytes sent
    opened: int = 0
    closed_by_server: int = 0
    failed_to_open: int = 0
    answers: dict[str, int] = dataclasses.field(default_factory=dict)

    def open_all(self) -> None:
        while len(self.sockets) < self.count and self.failed_to_open < 10 * self.count:
            self._open()

    def _open(self) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        except OSError:
            self.failed_to_open += 1
            return
        sock.setblocking(False)
        self.opened += 1
        self.sockets[sock] = 0
        if self.kind == "stalled":
            sock.sendall(STALLED)
        elif self.kind == "idle":
            sock.setblocking(True)
            sock.sendall(HEAD)
            sock.recv(4096)  # the answer (small, one segment)
            sock.setblocking(False)
        elif self.kind == "slowloris":
            self._send(sock)

    def _send(self, sock: socket.socket) -> None:
        sent = self.sockets[sock] % (len(HEAD) - 4)  # never the blank line that would end the head
        try:
            sock.send(HEAD[sent : sent + 1])
            self.sockets[sock] += 1
        except OSError:
            self._closed(sock, b"")

    def tick(self) -> None:
        """Read what the server sent (closes), trickle one byte on each slowloris, reopen closed ones."""
        readable, _, _ = select.select(list(self.sockets), [], [], 0) if self.sockets else ([], [], [])
        for sock in readable:
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            self._closed(sock, data)
        if self.kind == "slowloris":
            for sock in list(self.sockets):
                self._send(sock)
            self.open_all()

    def _closed(self, sock: socket.socket, data: bytes) -> None:
        status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "closed"
        self.answers[status] = self.answers.get(status, 0) + 1
        self.closed_by_server += 1
        self.sockets.pop(sock, None)
        sock.close()

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()


def _attack(port: int, kind: str, count: int, ready: Any, stop: Any, results: Any) -> None:
    """The attack's process: open the connections, keep them up once a second until ``stop``."""
    attack = Attack(port, kind, count)
    began = time.monotonic()
    attack.open_all()
    ready.set()
    opened_in = time.monotonic() - began
    while not stop.wait(1.0):  # the slowloris trickle: one byte per connection per second
        attack.tick()
    results.put({
        "opened in s": round(opened_in, 1),
        "attack open": len(attack.sockets),
        "attack opened": attack.opened,
        "closed by server": attack.answers,
    })  # fmt: skip
    attack.close()


def _usage(pid: int) -> str:
    """The server process's resident memory and threads (its children included: Granian's worker)."""
    rss, threads = 0, 0
    for task in [pid, *_children(pid)]:
        try:
            status = dict(line.split(":", 1) for line in Path(f"/proc/{task}/status").read_text().splitlines())
        except OSError:
            continue
        rss += int(status["VmRSS"].split()[0]) // 1024
        threads += int(status["Threads"])
    return f"{rss} MB, {threads} threads"


def _children(pid: int) -> list[int]:
    try:
        found = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return found + [grandchild for child in found for grandchild in _children(child)]


def measure(port: int, pid: int, kind: str, count: int, duration: float) -> dict[str, object]:
    """Normal requests every 0.2 s, from this process, while the attack runs in another."""
    context = multiprocessing.get_context("spawn")
    ready, stop, results = context.Event(), context.Event(), context.Queue()
    process = context.Process(target=_attack, args=(port, kind, count, ready, stop, results))
    process.start()
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    try:
        if not ready.wait(120):
            raise RuntimeError("the attack did not open its connections in 120 s")
        start = time.monotonic()
        while time.monotonic() - start < duration:
            began = time.monotonic()
            try:
                status = str(_get(port, timeout=10))
            except OSError as exc:
                status = type(exc).__name__
            latencies.append(time.monotonic() - began)
            statuses[status] = statuses.get(status, 0) + 1
            time.sleep(max(0.0, 0.2 - (time.monotonic() - began)))  # pacing the probe, not synchronisation
        usage = _usage(pid)
    finally:
        stop.set()
        attack = results.get(timeout=60)
        process.join(60)
    latencies.sort()
    return {
        "normal p50 ms": round(latencies[len(latencies) // 2] * 1000, 1),
        "p90 ms": round(latencies[int(len(latencies) * 0.9)] * 1000, 1),
        "max ms": round(latencies[-1] * 1000, 1),
        "normal statuses": statuses,
        "server during": usage,
        **attack,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", nargs="+", default=["werkzeug"], choices=["werkzeug", "granian"])
    parser.add_argument("--attacks", nargs="+", default=["slowloris", "idle", "silent", "stalled"])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--stalled", type=int, default=64)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of normal requests per attack")
    parser.add_argument("--max-connections", type=int, default=512, help="our server's connection cap")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.connections)), hard))
    for kind in args.servers:
        for name in args.attacks:
            with server(kind, args.max_connections) as (port, pid):
                count = args.stalled if name == "stalled" else args.connections
                result = measure(port, pid, "" if name == "silent" else name, count, args.duration)
                cap = f", cap {args.max_connections}" if kind == "werkzeug" else ""
                print(f"{kind}{cap}: {name} x{count}: {result}", flush=True)

if __name__ == "__main__":
    main()

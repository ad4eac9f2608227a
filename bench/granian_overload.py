"""Granian under overload and hostile clients: RSGI (``serve-core run --server granian``) vs WSGI.

Usage::

    python bench/granian_overload.py                              # RSGI, every run
    python bench/granian_overload.py --modes rsgi wsgi32 wsgi512 --runs overload
    python bench/granian_overload.py --runs slowloris idle silent stalled --connections 1000

Modes: ``rsgi`` is ``serve-core run --server granian`` (the async path of
``serve_core.http.rsgi``); ``wsgiN`` is Granian's WSGI interface over the same deployment
(``granian --interface wsgi --blocking-threads N --factory serve_core.http.granian:app_from_env``;
``wsgi32`` is what ``--server granian`` served before). Each server runs in its own process
on 127.0.0.1, serving ``/noop`` (returns at once), ``/slow`` (sleeps 10 ms, one replica,
``max_queue_size=100``) and ``/echo`` (reads the body).

Runs:

* ``overload``: ``--overload-connections`` (256) keep-alive connections call ``/slow`` as fast
  as answered, from another process, for ``--duration`` s. Reported: the share of 503s,
  whether every 503 had ``Retry-After``, and the latency of a ``GET /noop`` sent every 20 ms
  on a connection of its own meanwhile (p50, p99, max).
* ``slowloris``, ``idle``, ``silent``, ``stalled``: ``--connections`` (1,000; ``--stalled`` 64
  stalled bodies) held open from another process, while a normal ``GET /noop`` on a new
  connection is sent every 0.2 s; reported: its p50/max latency and statuses, and what became
  of the attack's connections. Slowloris sends a byte of a head per connection per second;
  idle connections made one request and stay silent; silent ones never send a byte; stalled
  bodies declare 100 bytes and send 5.

Every wait is bounded; nothing here asserts speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import resource
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
import time
import serve_core as serve

serve.create_endpoint("noop", "/noop")
serve.create_backend(lambda request: "ok", "noop:v1")
serve.link("noop", "noop:v1")


def slow(request):
    time.sleep(0.01)
    return "slow"


serve.create_endpoint("slow", "/slow")
serve.create_backend(slow, "slow:v1", backend_config=serve.BackendConfig(max_queue_size=100))
serve.link("slow", "slow:v1")
serve.create_endpoint("echo", "/echo", methods=["POST"])
serve.create_backend(lambda request: bytes(request.get_data()), "echo:v1")
serve.link("echo", "echo:v1")
"""
HEAD = b"GET /noop HTTP/1.1\r\nHost: bench\r\nX-Padding: " + b"x" * 64 + b"\r\n\r\n"
STALLED = b"POST /echo HTTP/1.1\r\nHost: bench\r\nContent-Length: 100\r\n\r\nhello"
SLOW = b"GET /slow HTTP/1.1\r\nHost: bench\r\n\r\n"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(port: int, timeout: float = 10.0) -> int:
    """One ``GET /noop`` on a new connection: its status (0 for no answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"GET /noop HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        reply = b""
        while b"\r\n" not in reply and (data := sock.recv(4096)):
            reply += data
        return int(reply.split()[1]) if reply.startswith(b"HTTP/") else 0


def _command(mode: str, app: Path, port: int, folder: str) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if mode == "rsgi":
        command = [sys.executable, "-m", "serve_core.cli", "run", str(app), "--server", "granian"]
        return [*command, "--port", str(port), "--kv-store", str(Path(folder, "s.db"))], env
    threads = mode.removeprefix("wsgi")
    env.update(SERVE_CORE_APP=str(app), SERVE_CORE_KV_STORE=str(Path(folder, "s.db")))
    command = [sys.executable, "-m", "granian", "--interface", "wsgi", "--factory", "--no-ws"]
    command += ["--blocking-threads", threads, "--port", str(port), "--log-level", "warning"]
    return [*command, "serve_core.http.granian:app_from_env"], env


@contextlib.contextmanager
def server(mode: str) -> Iterator[int]:
    """The deployment under Granian in ``mode``, in its own process; yields its port once it answers."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as folder:
        app = Path(folder, "app.py")
        app.write_text(textwrap.dedent(APP))
        command, env = _command(mode, app, port, folder)
        proc = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if _get(port) == 200:
                        break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"Granian ({mode}) did not start") from None
                    time.sleep(0.1)  # polling for the server to listen, bounded
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)


# ------------------------------------------------------------------ overload
async def _caller(port: int, stop: float, counts: dict[str, int]) -> None:
    """One keep-alive connection calling ``/slow`` until ``stop`` (monotonic)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.monotonic() < stop:
            writer.write(SLOW)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            status = head.split(b" ", 2)[1].decode()
            length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            await asyncio.wait_for(reader.readexactly(length), 30)
            counts[status] = counts.get(status, 0) + 1
            if status == "503" and b"\r\nretry-after:" not in head.lower():
                counts["503 without Retry-After"] = counts.get("503 without Retry-After", 0) + 1
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
        counts[type(exc).__name__] = counts.get(type(exc).__name__, 0) + 1
    finally:
        writer.close()


def _load(port: int, connections: int, duration: float, ready: Any, results: Any) -> None:
    """The overload's process: ``connections`` callers for ``duration`` seconds."""
    counts: dict[str, int] = {}

    async def main() -> None:
        stop = time.monotonic() + duration
        ready.set()
        await asyncio.gather(*(_caller(port, stop, counts) for _ in range(connections)))

    asyncio.run(main())
    results.put(counts)


def overload(port: int, connections: int, duration: float) -> dict[str, object]:
    """``/slow`` at ``connections`` in another process; ``GET /noop`` every 20 ms from this one."""
    context = multiprocessing.get_context("spawn")
    ready, results = context.Event(), context.Queue()
    process = context.Process(target=_load, args=(port, connections, duration, ready, results))
    process.start()
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    try:
        if not ready.wait(60):
            raise RuntimeError("the load did not start in 60 s")
        time.sleep(min(1.0, duration / 4))  # let the queue fill before probing (pacing, not synchronisation)
        conn = _Kept(port)
        end = time.monotonic() + duration * 0.75
        while time.monotonic() < end:
            began = time.monotonic()
            status = conn.get()
            latencies.append(time.monotonic() - began)
            statuses[status] = statuses.get(status, 0) + 1
            time.sleep(max(0.0, 0.02 - (time.monotonic() - began)))  # pacing the probe
        conn.close()
        counts = results.get(timeout=duration + 60)
    finally:
        process.join(60)
    answered = sum(count for status, count in counts.items() if status.isdigit())
    latencies.sort()
    return {
        "slow calls": answered,
        "503 share": f"{counts.get('503', 0) / max(answered, 1):.0%}",
        "statuses": counts,
        "noop p50 ms": round(latencies[len(latencies) // 2] * 1000, 1),
        "p99 ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 1),
        "max ms": round(latencies[-1] * 1000, 1),
        "noop statuses": statuses,
    }


class _Kept:
    """A keep-alive connection for the no-op probe (reopened if the server closes it)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.file: Any = None
        self.sock: socket.socket | None = None

    def get(self) -> str:
        try:
            if self.sock is None:
                self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
                self.file = self.sock.makefile("rb")
            self.sock.sendall(b"GET /noop HTTP/1.1\r\nHost: bench\r\n\r\n")
            status = self.file.readline().split()[1].decode()
            length = 0
            while (line := self.file.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            self.file.read(length)
            return status
        except (OSError, IndexError) as exc:
            self.close()
            return type(exc).__name__

    def close(self) -> None:
        if self.sock is not None:
            self.file.close()
            self.sock.close()
        self.sock = self.file = None


# ------------------------------------------------------------------ hostile connections
def _open(port: int, kind: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if kind == "stalled":
        sock.sendall(STALLED)
    elif kind == "idle":
        sock.sendall(HEAD)
        sock.recv(4096)
    sock.setblocking(False)
    return sock


def _attack(port: int, kind: str, count: int, ready: Any, stop: Any, results: Any) -> None:
    """The attack's process: hold ``count`` connections of ``kind`` until ``stop``; report their fate."""
    sockets: dict[socket.socket, int] = {}
    answers: dict[str, int] = {}
    opened = 0
    began = time.monotonic()
    while len(sockets) < count and opened < 10 * count:
        opened += 1
        with contextlib.suppress(OSError):
            sockets[_open(port, kind)] = 0
    opened_in = time.monotonic() - began
    ready.set()
    while not stop.wait(1.0):  # once a second: the slowloris trickle
        for sock in list(sockets):
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data is not None:  # answered or closed by the server
                status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "closed"
                answers[status] = answers.get(status, 0) + 1
                del sockets[sock]
                sock.close()
                if kind == "slowloris":  # a slowloris reconnects
                    opened += 1
                    with contextlib.suppress(OSError):
                        sockets[_open(port, kind)] = 0
            elif kind == "slowloris":
                sent = sockets[sock] % (len(HEAD) - 4)  # never the blank line that ends the head
                with contextlib.suppress(OSError):
                    sockets[sock] += sock.send(HEAD[sent : sent + 1])
    results.put({"opened in s": round(opened_in, 1), "opened": opened, "open at end": len(sockets),
                 "closed by server": answers})  # fmt: skip
    for sock in sockets:
        sock.close()


def hostile(port: int, kind: str, count: int, duration: float) -> dict[str, object]:
    """A normal ``GET /noop`` every 0.2 s on a new connection while the attack holds its connections."""
    context = multiprocessing.get_context("spawn")
    ready, stop, results = context.Event(), context.Event(), context.Queue()
    process = context.Process(target=_attack, args=(port, kind, count, ready, stop, results))
    process.start()
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    try:
        if not ready.wait(120):
            raise RuntimeError("the attack did not open its connections in 120 s")
        end = time.monotonic() + duration
        while time.monotonic() < end:
            began = time.monotonic()
            try:
                status = str(_get(port))
            except OSError as exc:
                status = type(exc).__name__
            latencies.append(time.monotonic() - began)
            statuses[status] = statuses.get(status, 0) + 1
            time.sleep(max(0.0, 0.2 - (time.monotonic() - began)))  # pacing the probe
    finally:
        stop.set()
        attack = results.get(timeout=120)
        process.join(60)
    latencies.sort()
    return {
        "normal p50 ms": round(latencies[len(latencies) // 2] * 1000, 1),
        "max ms": round(latencies[-1] * 1000, 1),
        "normal statuses": statuses,
        **attack,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["rsgi"], help="rsgi, or wsgiN (N blocking threads)")
    parser.add_argument("--runs", nargs="+", default=["overload", "slowloris", "idle", "silent", "stalled"])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--stalled", type=int, default=64)
    parser.add_argument("--overload-connections", type=int, default=256)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per run")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.connections)), hard))
    for mode in args.modes:
        if mode != "rsgi" and not mode.removeprefix("wsgi").isdigit():
            parser.error(f"unknown mode {mode!r}: rsgi or wsgiN")
        for run in args.runs:
            with server(mode) as port:
                if run == "overload":
                    result = overload(port, args.overload_connections, args.duration)
                    label = f"overload x{args.overload_connections}"
                else:
                    count = args.stalled if run == "stalled" else args.connections
                    result = hostile(port, run, count, args.duration)
                    label = f"{run} x{count}"
                load = os.getloadavg()[0]
                print(f"{mode}: {label}: {result} (load {load:.1f})", flush=True)


if __name__ == "__main__":
    main()

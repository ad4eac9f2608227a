"""One interface over the two ways the HTTP tests reach the app: Werkzeug's test client
(in-process) and ``requests`` through a real socket on 127.0.0.1; and a raw socket client
(:class:`Wire`) for what ``requests`` hides (keep-alive, ``100 Continue``, framing)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests
from werkzeug.test import Client

from serve_core import Serve
from serve_core.http.server import HTTPServer

from ..conftest import WAIT


@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def base_url(srv: Serve) -> str:
    """``http://host:port`` of the instance's standalone server."""
    address = srv.http_address()
    assert address is not None, "the instance has no HTTP server"
    return f"http://{address[0]}:{address[1]}"


class InProcess:
    """Werkzeug's test client over ``srv.wsgi_app()``."""

    kind = "test-client"

    def __init__(self, srv: Serve) -> None:
        self._client = Client(srv.wsgi_app())

    def request(self, method: str, path: str, **kwargs: Any) -> Reply:
        response = self._client.open(path, method=method, **kwargs)
        headers = {k.lower(): v for k, v in response.headers.items()}
        return Reply(response.status_code, headers, response.get_data())


class OverSocket:
    """``requests`` against the instance's standalone server."""

    kind = "socket"

    def __init__(self, srv: Serve) -> None:
        self.base = base_url(srv)

    def request(self, method: str, path: str, **kwargs: Any) -> Reply:
        if "query_string" in kwargs:
            kwargs["params"] = kwargs.pop("query_string")
        response = requests.request(method, self.base + path, timeout=WAIT, **kwargs)
        headers = {k.lower(): v for k, v in response.headers.items()}
        return Reply(response.status_code, headers, response.content)


class Wire:
    """A raw HTTP/1.x client connection: bytes out, responses read exactly as they are framed.

    Every read waits at most ``WAIT`` seconds (the socket's timeout).
    """

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=WAIT)
        self._file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def head(self) -> tuple[int, dict[str, str]]:
        """The next status line and headers (a ``100 Continue`` counts as a response of its own)."""
        status = self._file.readline()
        if not status:
            raise ConnectionError("the server closed the connection")
        headers: dict[str, str] = {}
        while (line := self._file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(status.split()[1]), headers

    def response(self, head_only: bool = False) -> Reply:
        """The next response, its body read by ``Content-Length``, chunks, or to the end of the connection."""
        status, headers = self.head()
        if head_only or status in (204, 304):
            body = b""
        elif "content-length" in headers:
            body = self._file.read(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            body = self._chunks()
        else:
            body = self._file.read()
        return Reply(status, headers, body)

    def closed_by_server(self) -> bool:
        """Whether the server closes the connection (waits up to the socket's timeout for it)."""
        try:
            return self._file.read(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def _chunks(self) -> bytes:
        parts: list[bytes] = []
        while size := int(self._file.readline().strip(), 16):
            parts.append(self._file.read(size))
            self._file.readline()
        self._file.readline()  # the blank line after the last chunk
        return b"".join(parts)


def wait_readable(sock: socket.socket, seconds: float) -> bool:
    """Whether the server sends something (or closes) on ``sock`` within ``seconds``."""
    readable, _, _ = select.select([sock], [], [], seconds)
    return bool(readable)


def timed_get(address: tuple[str, int], path: str = "/-/healthz") -> tuple[int, float]:
    """One normal ``GET`` on a new connection: its status and how long the answer took (connect included)."""
    began = time.monotonic()
    wire = Wire(address)
    try:
        wire.send(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
        return wire.response().status, time.monotonic() - began
    finally:
        wire.close()


class Servers:
    """Standalone servers started by a test on free loopback ports; :meth:`close` ends them all."""

    def __init__(self) -> None:
        self._started: list[HTTPServer] = []

    def start(self, app: Any, **options: Any) -> HTTPServer:
        self._started.append(HTTPServer(app, "127.0.0.1", 0, **options))
        return self._started[-1]

    def close(self) -> None:
        for server in self._started:
            server.close()


@contextlib.contextmanager
def granian_app(
    folder: Path, app: str, ready: Callable[[tuple[str, int]], bool], env: dict[str, str] | None = None
) -> Iterator[tuple[str, int]]:
    """``serve-core run --server granian`` of the deployment file text ``app`` on a free port.

    Yields its address once ``ready(address)`` holds (an ``OSError`` counts as not yet), then
    terminates it (killed if it does not end).
    """
    from ..net import free_port

    (folder / "app.py").write_text(app)
    port = free_port()
    command = [sys.executable, "-m", "serve_core.cli", "run", "app.py", "--server", "granian", "--port", str(port)]
    proc = subprocess.Popen(
        [*command, "--kv-store", str(folder / "s.db")], cwd=folder,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), **(env or {})),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    address = ("127.0.0.1", port)
    try:
        deadline = time.monotonic() + 6 * WAIT
        while True:
            with contextlib.suppress(OSError):
                if ready(address):
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "Granian did not start"
            time.sleep(0.05)  # polling for the server to listen, under a deadline
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(3 * WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT)

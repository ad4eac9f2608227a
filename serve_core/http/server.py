"""The standalone server: a threaded Werkzeug server running the app on a background thread.

The listening socket is bound by us before the server object is built, so a taken port
is a clear :class:`~serve_core.errors.ServeStateError` in the caller (Werkzeug would print
and ``sys.exit``), and ``port=0`` gets a free port reported by :attr:`HTTPServer.address`.
The server keeps answering while the instance drains (new calls get 503), and
:meth:`HTTPServer.close` (after the drain) stops accepting, then ends idle keep-alive
connections so that no handler thread outlives the instance.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

from ..errors import ServeStateError

log = logging.getLogger("serve_core.http")

WSGIApp = Callable[..., Any]


MAX_CONNECTIONS = 512
"""Open connections (each has a thread) before new ones get an immediate 503."""

IDLE_TIMEOUT_S = 30.0
"""A connection silent this long (idle keep-alive, or a stalled body) is closed."""

_OVERLOADED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: 34\r\n\r\ntoo many connections, retry later\n"
)


class _Handler(WSGIRequestHandler):
    """Werkzeug's handler, HTTP/1.1 keep-alive, without a log line per request."""

    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class _Server(ThreadedWSGIServer):
    """Tracks connections and their threads so that closing ends them all."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}

    def process_request(self, request: Any, client_address: Any) -> None:
        if len(self._connections) >= MAX_CONNECTIONS:
            try:
                request.sendall(_OVERLOADED)
            except OSError:
                pass  # the client went away; nothing to tell it
            self.shutdown_request(request)
            return
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=f"serve-http-{client_address[1]}",
            daemon=True,
        )
        with self._lock:
            self._connections[request] = thread
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._connections.pop(request, None)
        super().shutdown_request(request)

    def close_connections(self, timeout: float) -> None:
        """End every open connection and wait (bounded) for its thread.

        Reads are shut first, so a handler still writing a response finishes it and then
        sees end-of-stream instead of the next request; stragglers are cut after ``timeout``.
        """
        with self._lock:
            connections = dict(self._connections)
        deadline = time.monotonic() + timeout
        for how in (socket.SHUT_RD, socket.SHUT_RDWR):
            for sock in connections:
                try:
                    sock.shutdown(how)
                except OSError:
                    pass  # already closed
            for thread in connections.values():
                thread.join(max(0.0, deadline - time.monotonic()))
            if not any(t.is_alive() for t in connections.values()):
                return
            deadline = time.monotonic() + 1.0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise ServeStateError(
            f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}; "
            "choose another http_port (0 picks a free one) or stop the other server"
        ) from exc
    return sock


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HTTPServer:
    """A running threaded Werkzeug server for ``app`` on ``host:port``."""

    def __init__(self, app: WSGIApp, host: str, port: int) -> None:
        if not is_loopback(host):
            log.warning(
                "serving HTTP on non-loopback address %s: anyone who can reach it can call every "
                "endpoint (serve_core has no authentication); put a proxy with auth in front",
                repr(host) if host else "'' (every interface)",
            )
        sock = _bind(host, port)
        try:
            self._server = _Server(host, port, app, _Handler, fd=sock.fileno())
        finally:
            sock.close()  # the server holds its own duplicate of the descriptor
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="serve-http", daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` actually bound (the real port when 0 was asked)."""
        return self.host, self.port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def wait_ready(self, timeout: float) -> None:
        """Return once ``GET /-/healthz`` answers; poll until ``timeout``.

        Raises:
            ServeStateError: the server did not answer in time.
        """
        deadline = time.monotonic() + timeout
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host.strip("[]")
        host = "::1" if host == "::" else host
        while True:
            try:
                wait = max(0.1, deadline - time.monotonic())
                conn = http.client.HTTPConnection(host, self.port, timeout=wait)
                try:
                    conn.request("GET", "/-/healthz")
                    conn.getresponse().read()
                    return
                finally:
                    conn.close()
            except OSError as exc:
                if time.monotonic() >= deadline:
                    raise ServeStateError(f"HTTP server at {self.url} did not answer: {exc}") from exc
                threading.Event().wait(0.01)  # retry a refused connection shortly, bounded by deadline

    def stop_accepting(self) -> None:
        """Stop accepting connections and free the port; requests in flight continue."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, then end open connections (waiting up to ``timeout`` for their threads)."""
        self.stop_accepting()
        self._server.close_connections(timeout)

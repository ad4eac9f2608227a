"""The standalone server: a threaded Werkzeug server running the app on a background thread.

The listening socket is bound by us before the server object is built, so a taken port
is a clear :class:`~serve_core.errors.ServeStateError` in the caller (Werkzeug would print
and ``sys.exit``), and ``port=0`` gets a free port reported by :attr:`HTTPServer.address`.
The server keeps answering while the instance drains (new calls get 503), and
:meth:`HTTPServer.close` (after the drain) stops accepting, then ends idle keep-alive
connections so that no handler thread outlives the instance.

Connections are kept alive (HTTP/1.1, and HTTP/1.0 asking for it). Werkzeug's own
``run_wsgi`` answers every request with ``Connection: close``, because after the response
it reads and discards whatever the client sent, which would swallow the next request of a
kept connection; :class:`_Handler` replaces it. The request body is a bounded stream
(:class:`_Body`) that cannot read past its request, and a response is framed by its
``Content-Length``, else chunked (HTTP/1.1), else by closing. After the response, a body the
app left unread is skipped when it is small (:data:`SKIP_LIMIT`), else the connection closes.
``Expect: 100-continue`` is answered with one ``100 Continue`` when the app starts reading
the body, so a request refused without reading it (a declared body past the limit: 413 at
once, a 404, a 405) never gets one, and its connection closes after the answer.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import IO, Any, Protocol, runtime_checkable

from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

from ..errors import PayloadTooLargeError, ServeStateError
from .request import check_body_length
from .responses import error_response, internal_error

log = logging.getLogger("serve_core.http")

WSGIApp = Callable[..., Any]
StartResponse = Callable[..., Any]


MAX_CONNECTIONS = 512
"""Open connections (each has a thread) before new ones get an immediate 503."""

IDLE_TIMEOUT_S = 30.0
"""A connection silent this long (idle keep-alive, or a stalled body) is closed."""

SKIP_LIMIT = 64 * 1024
"""Unread request body bytes read and dropped after the response to keep the connection; more closes it."""

_OVERLOADED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: 34\r\n\r\ntoo many connections, retry later\n"
)
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CHUNK = 64 * 1024
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding"})  # ours to set (PEP 3333)
_DROPPED = (ConnectionError, TimeoutError)  # the client went away, or stayed silent past the idle timeout


@runtime_checkable
class BodyLimited(Protocol):
    """A WSGI app that declares the largest request body it accepts (:class:`~serve_core.http.ServeApp` does).

    The server reads the limit to refuse a larger declared body with 413 before calling the app.
    """

    max_body_bytes: int

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]: ...


class _Body(io.RawIOBase):
    """A request's body as the app reads it: never past its end, ``100 Continue`` sent before the first read.

    Args:
        stream: the connection's reader, or Werkzeug's de-chunking reader of a chunked body.
        length: the declared ``Content-Length``; ``None`` for a chunked body (read to its end).
        send_continue: sends ``100 Continue``, when the client expects one.
    """

    def __init__(self, stream: IO[bytes], length: int | None, send_continue: Callable[[], None] | None) -> None:
        super().__init__()
        self.length = length
        self._stream = stream
        self._left = length
        self._continue = send_continue
        self._ended = length == 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        size = len(buffer) if self._left is None else min(len(buffer), self._left)
        if self._ended or not size:
            return 0
        if self._continue is not None:
            send, self._continue = self._continue, None
            send()
        data = self._stream.read(size)
        buffer[: len(data)] = data
        if self._left is not None:
            self._left -= len(data)
        self._ended = not data or self._left == 0  # nothing read: the client closed or stopped sending
        return len(data)

    @property
    def complete(self) -> bool:
        """Whether the whole body has been read (the next bytes are the next request)."""
        return self._left == 0 if self._left is not None else self._ended

    @property
    def skippable(self) -> bool:
        """Whether what is left can be read and dropped to reach the next request.

        Not when ``100 Continue`` was never sent (the client may be waiting, or not send the
        body at all), nor for the unknown rest of a chunked body or a large rest.
        """
        if self.complete:
            return True
        return self._continue is None and self._left is not None and self._left <= SKIP_LIMIT

    def skip(self) -> bool:
        """Read and drop the rest of the body; whether the connection can serve another request."""
        if not self.skippable:
            return False
        try:
            while self.read(_CHUNK):
                pass
        except OSError:
            return False
        return self.complete


class _Response:
    """One WSGI response (``start_response`` and ``write``) framed so the connection can be kept.

    A declared ``Content-Length`` frames the body (bytes past it are dropped; a shorter body
    closes the connection); without one, an HTTP/1.1 body is chunked and an HTTP/1.0 one ends
    with the connection. The head goes out with the first body bytes, in one write.
    """

    def __init__(self, handler: _Handler, environ: dict[str, Any], body: _Body) -> None:
        self._handler = handler
        self._body = body
        self._head_only = environ["REQUEST_METHOD"] == "HEAD"
        self._status: str | None = None
        self._headers: list[tuple[str, str]] = []
        self._chunked = False
        self._left: int | None = None  # body bytes still to send under the declared length
        self.sent = False

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[..., None]:
        if exc_info is not None and self.sent:
            raise exc_info[1].with_traceback(exc_info[2])
        if exc_info is None and self._status is not None:
            raise RuntimeError("start_response() called twice without exc_info")
        self._status, self._headers = status, headers
        return self.write

    def write(self, data: bytes) -> None:
        head = b"" if self.sent else self._head()
        self._handler.wfile.write(head + self._frame(data))

    def finish(self) -> None:
        """End the response once the app's iterable is exhausted."""
        head = b"" if self.sent else self._head()
        end = b"0\r\n\r\n" if self._chunked else b""
        if head or end:
            self._handler.wfile.write(head + end)
        if self._left:
            self._handler.close_connection = True  # shorter than its Content-Length: the client waits for more

    def _frame(self, data: bytes) -> bytes:
        if self._left is not None:
            data = data[: self._left] if len(data) > self._left else data
            self._left -= len(data)
        elif self._chunked and data:  # an empty chunk would end the body
            data = b"%x\r\n%s\r\n" % (len(data), data)
        return data

    def _head(self) -> bytes:
        if self._status is None:
            raise RuntimeError("the app wrote its body before calling start_response()")
        handler = self._handler
        lines = [f"{handler.protocol_version} {self._status}", f"Server: {handler.version_string()}"]
        lines.append(f"Date: {handler.date_time_string()}")
        length: int | None = None
        for name, value in self._headers:
            key = name.lower()
            if key in _HOP_BY_HOP:
                handler.close_connection |= key == "connection" and value.lower() == "close"
                continue
            if key == "content-length":
                length = int(value)
            lines.append(f"{name}: {value}")
        lines += self._framing(int(self._status.split(None, 1)[0]), length)
        self.sent = True
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _framing(self, code: int, length: int | None) -> list[str]:
        """How the body is delimited, and whether the connection stays (decided with the head)."""
        handler = self._handler
        lines: list[str] = []
        if self._head_only or code < 200 or code in (204, 304):
            self._left = 0  # no body, whatever the app yields
        elif length is not None:
            self._left = length
        elif handler.request_version >= "HTTP/1.1":
            self._chunked = True
            lines.append("Transfer-Encoding: chunked")
        else:
            handler.close_connection = True  # HTTP/1.0 without a length: the body ends with the connection
        if not self._body.skippable:
            handler.close_connection = True
        if handler.close_connection:
            lines.append("Connection: close")
        elif handler.request_version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        return lines


class _Handler(WSGIRequestHandler):
    """Werkzeug's handler with keep-alive (see the module docstring), without a log line per request."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # a kept connection must not hold a small response back
    server: _Server
    _expects_continue = False

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.idle_timeout_s)

    def handle_expect_100(self) -> bool:
        self._expects_continue = True  # sent by the body on the app's first read, not before the app asks
        return True

    def run_wsgi(self) -> None:
        """Serve one request; the connection closes after it unless the next request can follow."""
        environ = self.make_environ()
        body = self._body(environ)
        response = _Response(self, environ, body)
        try:
            self._execute(self._refusal(body) or self.server.app, environ, response)
        except _DROPPED:
            self.close_connection = True
            return
        except Exception as exc:  # noqa: BLE001 - the app (or its response) failed: a 500 if still possible
            self._fail(exc, environ, response, body)
            return
        if not body.skip():
            self.close_connection = True

    def _body(self, environ: dict[str, Any]) -> _Body:
        """Put the bounded body stream in the environ."""
        send = self._send_continue if self._expects_continue else None
        self._expects_continue = False
        length: int | None = None
        if not environ.get("wsgi.input_terminated"):  # Werkzeug de-chunks a chunked body itself
            text = environ.get("CONTENT_LENGTH") or "0"
            if text.isascii() and text.isdigit():
                length = int(text)
            else:  # not a length: the body cannot be framed, nor the next request found
                length = 0
                self.close_connection = True
        body = _Body(environ["wsgi.input"], length, send)
        environ["wsgi.input"] = body
        return body

    def _refusal(self, body: _Body) -> WSGIApp | None:
        """A 413 for a declared body past the server's limit, answered without reading it."""
        limit = self.server.max_body_bytes
        if limit is None or body.length is None:
            return None
        try:
            check_body_length(body.length, limit)
        except PayloadTooLargeError as exc:
            return error_response(exc, debug=False, where=self.path)
        return None

    def _execute(self, app: WSGIApp, environ: dict[str, Any], response: _Response) -> None:
        chunks = app(environ, response.start_response)
        try:
            for data in chunks:
                response.write(data)
            response.finish()
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def _fail(self, exc: Exception, environ: dict[str, Any], response: _Response, body: _Body) -> None:
        self.close_connection = True
        error = internal_error(exc, debug=False, where=f"{self.command} {self.path}")  # logs it
        if not response.sent:
            try:
                self._execute(error, environ, _Response(self, environ, body))
            except OSError:
                pass  # the client went away; the error is logged

    def _send_continue(self) -> None:
        self.wfile.write(_CONTINUE)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass

    def log_error(self, format: str, *args: Any) -> None:
        # Idle keep-alive connections time out routinely; malformed requests get their 4xx.
        log.debug("HTTP connection %s: " + format, self.client_address, *args)


class _Server(ThreadedWSGIServer):
    """Tracks connections and their threads so that closing ends them all; holds the connection limits."""

    def __init__(
        self,
        host: str,
        port: int,
        app: WSGIApp,
        fd: int,
        *,
        max_connections: int,
        idle_timeout_s: float,
        max_body_bytes: int | None,
    ) -> None:
        super().__init__(host, port, app, _Handler, fd=fd)
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.max_body_bytes = max_body_bytes
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        if len(self._connections) >= self.max_connections:
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


def _warn_if_exposed(host: str) -> None:
    if not is_loopback(host):
        log.warning(
            "serving HTTP on non-loopback address %s: anyone who can reach it can call every "
            "endpoint (serve_core has no authentication); put a proxy with auth in front",
            repr(host) if host else "'' (every interface)",
        )


class HTTPServer:
    """A running threaded Werkzeug server for ``app`` on ``host:port``.

    Args:
        app: the WSGI application.
        host: the address to bind (a warning is logged unless it is a loopback address).
        port: the port; 0 picks a free one (see :attr:`address`).
        max_body_bytes: a declared request body larger than this is answered 413 before the app
            is called, without reading it; default: the app's own limit when it declares one
            (:class:`BodyLimited`, as ``ServeApp`` does), else none.
        idle_timeout_s: a connection silent this long is closed.
        max_connections: open connections before new ones get an immediate 503.
    """

    def __init__(
        self,
        app: WSGIApp,
        host: str,
        port: int,
        *,
        max_body_bytes: int | None = None,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        _warn_if_exposed(host)
        if max_body_bytes is None and isinstance(app, BodyLimited):
            max_body_bytes = app.max_body_bytes
        sock = _bind(host, port)
        try:
            self._server = _Server(
                host,
                port,
                app,
                sock.fileno(),
                max_connections=max_connections,
                idle_timeout_s=idle_timeout_s,
                max_body_bytes=max_body_bytes,
            )
        finally:
            sock.close()  # the server holds its own duplicate of the descriptor
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="serve-http", daemon=True
        )
        self._thread.start()

    @property
    def max_body_bytes(self) -> int | None:
        """The body limit the server applies itself (``None``: left to the app)."""
        return self._server.max_body_bytes

    @property
    def open_connections(self) -> int:
        """Connections open now (each holds a handler thread)."""
        return self._server.open_connections

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

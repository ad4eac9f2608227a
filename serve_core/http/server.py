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
kept connection; :class:`_Handler` replaces it, and the stdlib's lenient request parsing
with :func:`~serve_core.http.parsing.read_head` (strict, RFC 9112). What one connection reads
and writes (deadlines, bounded bodies, framing) is in :mod:`.connection`. After the
response, a body the app left unread is skipped when it is small (:data:`SKIP_LIMIT`), else
the connection closes. ``Expect: 100-continue`` is answered with one ``100 Continue`` when
the app starts reading the body, so a request refused without reading it (a declared body
past the limit: 413 at once, a 404, a 405) never gets one, and its connection closes after
the answer.

Each connection has a thread (reused: :class:`_Workers`). At :data:`MAX_CONNECTIONS`, a new connection first evicts one
that serves no request — a connection closing, the longest idle kept one, else the oldest
unfinished head — and is refused with 503 only when every connection is busy.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Protocol, runtime_checkable

from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

from ..errors import PayloadTooLargeError, ServeStateError
from .connection import (
    BODY_MIN_RATE,
    BODY_TIMEOUT_S,
    EVICTABLE,
    HEAD_TIMEOUT_S,
    IDLE_TIMEOUT_S,
    SKIP_LIMIT,
    Body,
    Expired,
    Limits,
    Phase,
    Response,
    SocketWriter,
    TimedReader,
    linger,
)
from .disconnect import ON_DISCONNECT, DisconnectWatcher
from .disconnect import available as disconnect_watching
from .parsing import ChunkedBody, Head, Malformed, answer, read_head
from .request import check_body_length
from .responses import error_response, internal_error
from .streaming import StreamBroken

__all__ = [
    "BODY_MIN_RATE",
    "BODY_TIMEOUT_S",
    "HEAD_TIMEOUT_S",
    "IDLE_TIMEOUT_S",
    "MAX_CONNECTIONS",
    "SKIP_LIMIT",
    "BodyLimited",
    "HTTPServer",
    "is_loopback",
]

log = logging.getLogger("serve_core.http")

WSGIApp = Callable[..., Any]
StartResponse = Callable[..., Any]


MAX_CONNECTIONS = 512
"""Open connections (each has a thread); past it, an idle one or an unfinished head is evicted, else 503."""

_OVERLOADED = answer(503, "too many connections, retry later", extra="Retry-After: 1\r\n")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_BUFFER = 16 * 1024  # the connection's read buffer
_RANK = {phase: rank for rank, phase in enumerate(EVICTABLE)}  # who is evicted first
_DROPPED = (ConnectionError, TimeoutError)  # the client went away, or stayed silent past a deadline


@runtime_checkable
class BodyLimited(Protocol):
    """A WSGI app that declares the largest request body it accepts (:class:`~serve_core.http.ServeApp` does).

    The server reads the limit to refuse a larger declared body with 413 before calling the app.
    """

    max_body_bytes: int

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]: ...


class _Handler(WSGIRequestHandler):
    """Werkzeug's handler with keep-alive, deadlines and strict parsing (see the module docstring)."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        self.connection = self.request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)  # kept: no held-back answers
        self.reader = self.server.reader_of(self.request)
        self.input = io.BufferedReader(self.reader, _BUFFER)
        self.rfile = self.input
        self.wfile = SocketWriter(self.request, self.server.limits.idle_timeout_s)
        self.linger = False  # the client may still be sending: read and drop before closing

    def handle_one_request(self) -> None:
        """Read one request head and serve it; the connection closes after it unless the next can follow."""
        self.close_connection = True
        try:
            head = read_head(self.input)
        except Expired as exc:
            if exc.phase is Phase.HEAD and exc.partial:
                self._refuse(408, f"the request head did not arrive within {self.server.limits.head_timeout_s} s")
            return
        except Malformed as exc:
            self._refuse(exc.status, str(exc))
            return
        if head is None:
            return  # the client closed between requests
        self.reader.enter(Phase.BUSY)
        self._adopt(head)
        self.run_wsgi()
        if not self.close_connection:
            self.reader.enter(Phase.IDLE)

    def _adopt(self, head: Head) -> None:
        """Take the head's parts where Werkzeug's ``make_environ`` looks for them."""
        self.head = head
        self.command, self.request_version, self.headers = head.method, head.version, head.headers
        self.path = "/" + head.target.lstrip("/") if head.target.startswith("//") else head.target  # as the stdlib
        self.requestline = f"{head.method} {self.path} {head.version}"
        self.close_connection = head.close

    def run_wsgi(self) -> None:
        """Serve the request read by :meth:`handle_one_request`."""
        try:
            environ = self.make_environ()
        except ValueError:  # a target urllib cannot split (e.g. a bad IPv6 host)
            self._refuse(400, "malformed request target")
            return
        body = self._body(environ)
        if self.server.disconnects is not None:
            environ[ON_DISCONNECT] = partial(self._watch, body)
        response = Response(
            self.wfile.write, self.request_version, self.command, body,
            close=self.close_connection, server=self.version_string(),
        )  # fmt: skip
        try:
            self._execute(self._refusal(body) or self.server.app, environ, response, body)
        except _DROPPED:
            self.close_connection = True
            return
        except StreamBroken:  # logged with its error id: the body ends unterminated, the connection closes
            self.close_connection = True
            return
        except Exception as exc:  # noqa: BLE001 - the app (or its response) failed: a 500 if still possible
            self._fail(exc, environ, response, body)
            return
        self.close_connection = response.close or not body.skip()
        self.linger = self.close_connection and not body.complete

    def _body(self, environ: dict[str, Any]) -> Body:
        """Put the bounded body stream in the environ."""
        head = self.head
        send = self._send_continue if head.expects_continue else None
        if head.chunked:
            stream: Any = ChunkedBody(self.input)
            environ["wsgi.input_terminated"] = True
            environ["HTTP_TRANSFER_ENCODING"] = "chunked"  # checked: exactly chunked, however it was spelled
        else:
            stream = self.input
            environ.pop("wsgi.input_terminated", None)
        body = Body(stream, head.length, self.reader, send)
        environ["wsgi.input"] = body
        return body

    def _watch(self, body: Body, callback: Callable[[], None]) -> Callable[[], None] | None:
        """``environ[ON_DISCONNECT]``: watch this connection while the app waits (once its body is read)."""
        watcher = self.server.disconnects
        if watcher is None or not body.complete:
            return None
        return watcher.watch(self.connection, callback)

    def _refusal(self, body: Body) -> WSGIApp | None:
        """A 413 for a declared body past the server's limit, answered without reading it."""
        limit = self.server.max_body_bytes
        if limit is None or body.length is None:
            return None
        try:
            check_body_length(body.length, limit)
        except PayloadTooLargeError as exc:
            return error_response(exc, debug=False, where=self.path)
        return None

    def _execute(self, app: WSGIApp, environ: dict[str, Any], response: Response, body: Body) -> None:
        chunks = app(environ, response.start_response)
        try:
            if body.failure is not None and not response.sent:
                raise body.failure  # the app answered a body it could not read: ours replaces it
            for data in chunks:
                response.write(data)
            response.finish()
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def _fail(self, exc: Exception, environ: dict[str, Any], response: Response, body: Body) -> None:
        self.close_connection = True
        if body.failure is not None:  # the body could not be read: the client's fault, answered as such
            if not response.sent:
                code = body.failure.code or 400
                self._refuse(code, body.failure.description or "bad request body")
            self.linger = True
            return
        error = internal_error(exc, debug=False, where=f"{self.command} {self.path}")  # logs it
        if not response.sent:
            retry = Response(
                self.wfile.write, self.request_version, self.command, body, close=True, server=self.version_string()
            )
            try:
                self._execute(error, environ, retry, body)
            except OSError:
                pass  # the client went away; the error is logged
        self.linger = not body.complete

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with the server's own plain-text response, then close (after lingering)."""
        self.close_connection = True
        self.linger = True
        try:
            self.wfile.write(answer(status, message))
        except OSError:
            pass  # the client went away; nothing to tell it

    def _send_continue(self) -> None:
        self.wfile.write(_CONTINUE)

    def finish(self) -> None:
        if self.linger and self.reader.phase is not Phase.EVICTED:
            try:
                self.reader.enter(Phase.CLOSING)  # evictable while it lingers
            except ConnectionAbortedError:
                pass  # evicted meanwhile: the socket is shut already
            else:
                linger(self.connection)
        super().finish()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass

    def log_error(self, format: str, *args: Any) -> None:
        # Idle keep-alive connections time out routinely; malformed requests get their 4xx.
        log.debug("HTTP connection %s: " + format, self.client_address, *args)


class _Workers:
    """Threads that serve connections, one connection at a time each, reused.

    ``Thread.start()`` waits until the new thread holds the GIL; under a flood of new
    connections that wait, in the accepting thread, was most of the cost of accepting
    (4.1 s of 5.7 s over 10 s of a reconnecting slowloris). A spare worker takes a
    connection from a queue instead; one idle for ``idle_s`` ends.
    """

    def __init__(self, serve: Callable[..., None], name: str, idle_s: float = 60.0) -> None:
        self._serve = serve
        self._name = name
        self._idle_s = idle_s
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._spare = 0  # workers waiting for a connection that none is queued for
        self._started = 0
        self._threads: set[threading.Thread] = set()

    def submit(self, *item: Any) -> None:
        """Serve ``self._serve(*item)`` on a spare worker, or a new one."""
        thread = None
        with self._lock:
            if self._spare:
                self._spare -= 1
            else:
                self._started += 1
                thread = threading.Thread(target=self._run, name=f"{self._name}-{self._started}", daemon=True)
                self._threads.add(thread)
        self._queue.put(item)
        if thread is not None:
            thread.start()

    def _run(self) -> None:
        try:
            while True:
                try:
                    item = self._queue.get(timeout=self._idle_s)
                except queue.Empty:
                    with self._lock:
                        if self._spare:  # no connection is on its way to this worker
                            self._spare -= 1
                            return
                    continue
                if item is None:
                    return
                self._serve(*item)
                with self._lock:
                    self._spare += 1
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def stop(self, timeout: float) -> None:
        """End every worker once it has finished its connection; wait up to ``timeout``."""
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class _Server(ThreadedWSGIServer):
    """Tracks connections and their threads so that closing ends them all; makes room at the cap."""

    def __init__(
        self,
        host: str,
        port: int,
        app: WSGIApp,
        fd: int,
        *,
        max_connections: int,
        limits: Limits,
        max_body_bytes: int | None,
    ) -> None:
        super().__init__(host, port, app, _Handler, fd=fd)
        self.max_connections = max_connections
        self.limits = limits
        self.max_body_bytes = max_body_bytes
        self.evictions = 0
        self._lock = threading.Lock()
        self._ended = threading.Condition(self._lock)
        self._connections: dict[socket.socket, TimedReader] = {}
        self._evicted: dict[socket.socket, TimedReader] = {}  # out of the count; their workers still ending
        self._workers = _Workers(self.process_request_thread, "serve-http")
        self.disconnects = DisconnectWatcher() if disconnect_watching() else None

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def connection_phases(self) -> dict[str, int]:
        with self._lock:
            phases = [reader.phase.name.lower() for reader in self._connections.values()]
        return {phase: phases.count(phase) for phase in sorted(set(phases))}

    def reader_of(self, sock: socket.socket) -> TimedReader:
        with self._lock:
            return self._connections.get(sock) or self._evicted[sock]

    def process_request(self, request: Any, client_address: Any) -> None:
        reader = TimedReader(request, self.limits, time.monotonic())
        with self._lock:
            room = len(self._connections) < self.max_connections or self._make_room()
            if room:
                self._connections[request] = reader
        if not room:
            try:
                request.sendall(_OVERLOADED)
            except OSError:
                pass  # the client went away; nothing to tell it
            self.shutdown_request(request)
            return
        self._workers.submit(request, client_address)

    def _make_room(self) -> bool:
        """Evict the connection that serves no request and waited longest (closing, idle, then heads)."""
        while True:
            victim, best = None, (len(_RANK), 0.0)
            for sock, reader in self._connections.items():  # one pass: this runs on every accept at the cap
                rank = _RANK.get(reader.phase)
                if rank is not None and (rank, reader.since) < best:
                    victim, best = sock, (rank, reader.since)
            if victim is None:
                return False
            if self._connections[victim].evict():  # fails if it has just started a request: try again
                self._evicted[victim] = self._connections.pop(victim)
                self.evictions += 1
                return True

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._connections.pop(request, None)
            self._evicted.pop(request, None)
            self._ended.notify_all()
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.error("HTTP connection %s failed", client_address, exc_info=True)

    def _all_ended(self) -> bool:
        return not self._connections and not self._evicted

    def close_connections(self, timeout: float) -> None:
        """End every open connection and wait (bounded) for it, then end the workers.

        Reads are shut first, so a handler still writing a response finishes it and then
        sees end-of-stream instead of the next request; stragglers are cut after ``timeout``.
        """
        deadline = time.monotonic() + timeout
        for how in (socket.SHUT_RD, socket.SHUT_RDWR):
            with self._lock:
                sockets = [*self._connections, *self._evicted]
            for sock in sockets:
                try:
                    sock.shutdown(how)
                except OSError:
                    pass  # already closed
            with self._ended:
                if self._ended.wait_for(self._all_ended, deadline - time.monotonic()):
                    break
            deadline = time.monotonic() + 1.0
        self._workers.stop(max(1.0, deadline - time.monotonic()))


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
        idle_timeout_s: a kept connection waits this long for its next request; no read or
            write of a request waits longer.
        head_timeout_s: the whole request head must arrive within this many seconds of its
            start (408 and close past it).
        body_timeout_s: a request body gets this many seconds from the app's first read...
        body_min_rate: ...plus one second per this many bytes received (408 and close past it).
        max_connections: open connections; past it, a new one evicts a closing or idle
            connection or the oldest unfinished head, else gets an immediate 503.

    Raises:
        ServeStateError: the address cannot be bound.
        ValidationError: a timeout or rate is not a positive number.
    """

    def __init__(
        self,
        app: WSGIApp,
        host: str,
        port: int,
        *,
        max_body_bytes: int | None = None,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        head_timeout_s: float = HEAD_TIMEOUT_S,
        body_timeout_s: float = BODY_TIMEOUT_S,
        body_min_rate: float = BODY_MIN_RATE,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        limits = Limits(
            idle_timeout_s=idle_timeout_s,
            head_timeout_s=head_timeout_s,
            body_timeout_s=body_timeout_s,
            body_min_rate=body_min_rate,
        )
        _warn_if_exposed(host)
        if max_body_bytes is None and isinstance(app, BodyLimited):
            max_body_bytes = app.max_body_bytes
        sock = _bind(host, port)
        try:
            self._server = _Server(
                host, port, app, sock.fileno(),
                max_connections=max_connections, limits=limits, max_body_bytes=max_body_bytes,
            )  # fmt: skip
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
    def limits(self) -> Limits:
        """The deadlines of every connection."""
        return self._server.limits

    @property
    def open_connections(self) -> int:
        """Connections open now (each holds a handler thread), evicted ones not counted."""
        return self._server.open_connections

    @property
    def evictions(self) -> int:
        """Connections evicted so far to make room for new ones."""
        return self._server.evictions

    def connection_phases(self) -> dict[str, int]:
        """How many open connections are in each phase: ``head``, ``idle``, ``body``, ``busy``, ``closing``
        (those with none left out); what eviction goes by (closing, then idle, then heads)."""
        return self._server.connection_phases()

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
        if self._server.disconnects is not None:
            self._server.disconnects.close()
            self._server.disconnects = None

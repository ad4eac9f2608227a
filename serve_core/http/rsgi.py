"""Granian's RSGI interface over a :class:`~.app.ServeApp`: no thread waits for a body or a result.

Under WSGI a request holds one of Granian's blocking threads from its first body read to
its last response byte: a stalled body holds it until the client gives up, and a request
waiting for its backend holds it for the whole wait, so a few dozen of either stop every
endpoint, and a slow backend's own queue never fills (the backlog waits for a thread
inside Granian instead, where ``max_queue_size`` cannot answer it). Here, on Granian's
event loop, per request:

1. **The body** (when there is one) is awaited within :data:`BODY_TIMEOUT_S` plus one
   second per :data:`BODY_MIN_RATE` bytes (the standalone server's model), else 408 and
   the connection closes. A declared length past ``max_body_bytes`` gets 413 before any
   of it is read; a chunked body is cut (413) at the limit.
2. **A call to an endpoint** is enqueued (:meth:`Serve.enqueue`) and its
   :class:`~serve_core.queues.ServeFuture` awaited: a waiting request costs a coroutine,
   so the backend's queue is what fills, and its 503 with ``Retry-After`` is the answer.
3. **Everything else** (the ``/-/`` routes, 404, 405, an ``OPTIONS`` the front answers)
   runs the WSGI app, unchanged, on a small thread pool (:data:`WSGI_THREADS`), and so does
   a backend's own Werkzeug ``Response``: these wait for nothing but their own work. Their
   bodies are collected whole and then sent (a WSGI server would stream an iterable body).

The request a backend receives is the same buffered :class:`~.request.ServeRequest` as
under WSGI, with the same environ keys Granian's WSGI interface gives (the path is the
UTF-8 Granian decoded, re-encoded as WSGI's latin-1 string). Request ids, ``Server-Timing``
and access-log records follow :class:`~.app.ServeApp`'s rules.
"""

from __future__ import annotations

import asyncio
import io
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from werkzeug.exceptions import RequestTimeout

from ..errors import ClientClosedRequest, PayloadTooLargeError, RequestTimeoutError, ServeError, ValidationError
from ..queues import ServeFuture, Timing
from ..streams import ItemStream
from .accesslog import (
    REQUEST_ID_ENVIRON,
    REQUEST_ID_HEADER,
    AccessLog,
    RequestIds,
    assign_request_id,
    server_timing,
    valid_request_id,
)
from .app import ServeApp
from .disconnect import WATCH_AFTER_S
from .request import ServeRequest, buffer_body, call_method, check_body_length, parse_slo, shard_key
from .responses import PlainResponse, encode_result, error_response, text_response
from .routing import RouteEntry
from .streaming import content_type, send_stream, wants_events

BODY_TIMEOUT_S = 10.0
"""A request body gets this many seconds, plus one per :data:`BODY_MIN_RATE` bytes, else 408."""

BODY_MIN_RATE = 8 * 1024
"""Bytes per second a body must keep up on average after :data:`BODY_TIMEOUT_S`."""

log = logging.getLogger("serve_core.http")

WSGI_THREADS = 4
"""Threads running the WSGI app for what the front answers itself (see the module docstring)."""

_CLOSE = (("Connection", "close"),)  # the body was not read to its end: the connection cannot be reused
_OURS = frozenset({"x-request-id", "server-timing"})  # response headers the front sets
Headers = list[tuple[str, str]]


async def read_body(proto: Any, environ: dict[str, Any], limit: int, timeout_s: float, min_rate: float) -> bytes:
    """The request body, awaited within ``timeout_s`` plus one second per ``min_rate`` bytes.

    Raises:
        PayloadTooLargeError: the declared or received length passes ``limit``.
        RequestTimeout: the body did not arrive in time (Werkzeug's 408).
    """
    declared = environ.get("CONTENT_LENGTH")
    if declared:
        length = int(declared)  # Granian has refused a malformed Content-Length with 400
        check_body_length(length, limit)
        budget = timeout_s + length / min_rate
        try:
            return bytes(await asyncio.wait_for(proto(), budget))
        except asyncio.TimeoutError:
            raise RequestTimeout(f"the request body of {length} bytes did not arrive within {budget:g} s") from None
    if "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", ""):
        return b""
    return await _read_chunked(proto, limit, timeout_s, min_rate)


async def _read_chunked(proto: Any, limit: int, timeout_s: float, min_rate: float) -> bytes:
    """A body of unknown length: its deadline grows with the bytes received, and it stops at ``limit``."""
    started = time.monotonic()
    chunks = aiter(proto)
    parts: list[bytes] = []
    size = 0
    while True:
        left = started + timeout_s + size / min_rate - time.monotonic()
        try:
            chunk = await asyncio.wait_for(anext(chunks), max(left, 0.0))
        except StopAsyncIteration:
            return b"".join(parts)
        except asyncio.TimeoutError:
            message = f"the request body did not keep up {min_rate:g} bytes/s after {timeout_s:g} s"
            raise RequestTimeout(message) from None
        parts.append(bytes(chunk))
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"request body is larger than the limit of {limit} bytes")


def environ_from_scope(scope: Any, base: dict[str, Any]) -> dict[str, Any]:
    """The WSGI environ of an RSGI HTTP scope, with the keys Granian's WSGI interface sets."""
    host, _, port = scope.server.rpartition(":")
    environ = dict(base)
    environ.update(
        REQUEST_METHOD=scope.method,
        PATH_INFO=scope.path.encode("utf-8").decode("latin-1"),
        QUERY_STRING=scope.query_string,
        SERVER_PROTOCOL="HTTP/2" if scope.http_version == "2" else f"HTTP/{scope.http_version}",
        SERVER_NAME=host.strip("[]"),
        SERVER_PORT=port,
        REMOTE_ADDR=scope.client.rpartition(":")[0].strip("[]"),
    )
    environ["wsgi.url_scheme"] = scope.scheme
    for name, value in scope.headers.items():
        key = name.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


_BASE_ENVIRON: dict[str, Any] = {  # what Granian's WSGI interface puts in every environ
    "GATEWAY_INTERFACE": "CGI/1.1",
    "SCRIPT_NAME": "",
    "SERVER_SOFTWARE": "Granian",
    "wsgi.errors": sys.stderr,
    "wsgi.input_terminated": True,
    "wsgi.multiprocess": False,
    "wsgi.multithread": True,
    "wsgi.run_once": False,
    "wsgi.version": (1, 0),
}


def run_wsgi(app: Callable[..., Iterable[bytes]], environ: dict[str, Any]) -> tuple[int, Headers, bytes]:
    """Call a WSGI app (or response) to the end: its status, headers and whole body."""
    started: list[Any] = []

    def start_response(status: str, headers: Headers, exc_info: Any = None) -> Callable[[bytes], None]:
        started[:] = (int(status.split(" ", 1)[0]), list(headers))
        return _no_write

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    status, headers = started
    return status, headers, body


def _answered(future: ServeFuture | None) -> bool:
    """Whether the backend's call ended (with a result or its own exception), rather than being withdrawn."""
    return future is not None and future.done() and not future.cancelled()


def _no_write(data: bytes) -> None:
    raise RuntimeError("the write() callable of start_response is not supported; return the body")


class Wakeups:
    """Hands futures resolved on replica threads to the event loop, a batch per wake-up.

    ``asyncio.wrap_future`` wakes the loop (a write to its self-pipe, a ``call_soon_threadsafe``)
    once per future; under load most futures resolve while the loop is busy, so here those
    that resolve before the loop gets to them share one wake-up.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._ready: list[asyncio.Future[bool]] = []
        self._lock = threading.Lock()

    def watch(self, future: ServeFuture) -> asyncio.Future[bool]:
        """A loop future set to True once ``future`` is done."""
        waiter: asyncio.Future[bool] = self.loop.create_future()
        future.add_done_callback(lambda _: self._push(waiter))
        return waiter

    def _push(self, waiter: asyncio.Future[bool]) -> None:
        with self._lock:
            self._ready.append(waiter)
            if len(self._ready) > 1:
                return  # a wake-up is already on its way
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: Granian's worker is gone, nobody waits
            pass

    def _drain(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        for waiter in ready:
            if not waiter.done():  # not cancelled or expired meanwhile
                waiter.set_result(True)


async def _answered_or_gone(waiter: asyncio.Future[bool], proto: Any) -> bool:
    """``await waiter``; past :data:`WATCH_AFTER_S`, raises ``ClientClosedRequest`` if the client leaves first."""
    done, _ = await asyncio.wait((waiter,), timeout=WATCH_AFTER_S)
    if done:
        return waiter.result()
    gone = asyncio.ensure_future(proto.client_disconnect())
    try:
        await asyncio.wait((waiter, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if waiter.done():
        return waiter.result()
    waiter.cancel()
    raise ClientClosedRequest("the client closed the connection; its call was cancelled")


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class RSGIApp:
    """An RSGI application serving a :class:`ServeApp`'s instance (see the module docstring).

    Args:
        app: the WSGI app; its routes, limits (``max_body_bytes``, ``request_timeout_s``)
            and ``debug`` apply, and it answers every request the front answers itself.
        body_timeout_s, body_min_rate: the body deadline (:data:`BODY_TIMEOUT_S`, :data:`BODY_MIN_RATE`).
        threads: the pool running the WSGI app (:data:`WSGI_THREADS`).
    """

    def __init__(
        self,
        app: ServeApp,
        *,
        body_timeout_s: float = BODY_TIMEOUT_S,
        body_min_rate: float = BODY_MIN_RATE,
        threads: int = WSGI_THREADS,
    ) -> None:
        for name, value in (("body_timeout_s", body_timeout_s), ("body_min_rate", body_min_rate)):
            if not 0 < value < float("inf"):
                raise ValidationError(f"{name} must be a positive number, got {value!r}")
        self.app = app
        self.body_timeout_s, self.body_min_rate = body_timeout_s, body_min_rate
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="serve-rsgi")
        self._base = _BASE_ENVIRON
        config = app.serve.metrics.config
        self._ids = RequestIds() if config.request_ids else None
        self._server_timing = config.server_timing
        self._access = AccessLog()
        self._wakeups: Wakeups | None = None

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        """Granian's worker start, with the loop every request runs on."""
        self._wakeups = Wakeups(loop)

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        """Granian's worker stop: the pool's threads end once their work is done."""
        self._pool.shutdown(wait=False)

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        if scope.proto != "http":
            return  # websockets are disabled (run_granian); Granian closes anything else
        started = time.perf_counter()
        environ = environ_from_scope(scope, self._base)
        if not await self._body(proto, environ, started):
            return
        entry = self._endpoint_route(environ)
        if entry is not None:
            await self._call(proto, environ, entry, started)
        else:
            status, headers, out = await self._in_pool(run_wsgi, self.app.wsgi_app, environ)
            proto.response_bytes(status, headers, out)

    async def _body(self, proto: Any, environ: dict[str, Any], started: float) -> bool:
        """Read the body into ``wsgi.input``; False when it was refused (408, 413) or the client left."""
        try:
            body = await read_body(proto, environ, self.app.max_body_bytes, self.body_timeout_s, self.body_min_rate)
        except RequestTimeout as exc:
            self._refuse(proto, environ, 408, str(exc.description), started)
            return False
        except PayloadTooLargeError as exc:
            self._refuse(proto, environ, 413, str(exc), started)
            return False
        except RuntimeError:  # Granian's RSGIProtocolClosed: the client left mid-body, nobody to answer
            return False
        environ["wsgi.input"] = io.BytesIO(body)
        if body:  # a chunked body now has a length (as buffer_body gives it); else the environ stays as sent
            environ["CONTENT_LENGTH"] = str(len(body))
        return True

    def _endpoint_route(self, environ: dict[str, Any]) -> RouteEntry | None:
        """The route of a call this front makes itself; None for what the WSGI app answers."""
        path, method = environ["PATH_INFO"], environ["REQUEST_METHOD"]
        if path.startswith("/-/"):
            return None
        try:
            entry = self.app.url_map.match(path, method)
        except ServeError:  # 404 and 405, with the WSGI app's hints
            return None
        if method == "OPTIONS" and "OPTIONS" not in entry.methods:
            return None
        return entry

    async def _call(self, proto: Any, environ: dict[str, Any], entry: RouteEntry, started: float) -> None:
        request = ServeRequest(environ)
        request_id = None
        future: ServeFuture | None = None
        try:
            request_id = self._request_id(environ)
            future = self._enqueue(request, entry)
            try:
                await self._wait(future, entry.endpoint, proto)
            finally:
                request.serve_timing = future.timing
            result = future.result()
            if isinstance(result, ItemStream):  # a generator backend: streamed (docs/streaming.md)
                await self._stream(proto, environ, result, request_id, request, started)
                return
            response = encode_result(result)
        except BaseException as exc:  # noqa: BLE001 - every failure is an answer, as in ServeApp.wsgi_app
            if isinstance(exc, asyncio.CancelledError) and not _answered(future):
                raise  # this task was cancelled, not the backend's call: nothing to answer
            response = error_response(exc, debug=self.app.debug, where=f"{request.method} {request.path}")
            if self._ids is not None and request_id is None:  # the client's id itself was refused
                request_id = self._ids.new()
        if type(response) is PlainResponse:
            status, headers, out = response.status_code, response.headers, response.body
        else:  # the backend's own Response: it may stream, so on a thread
            status, headers, out = await self._in_pool(run_wsgi, response, environ)
        self._send(proto, environ, (status, headers, out), request_id, request, started)

    async def _stream(
        self, proto: Any, environ: dict[str, Any], stream: ItemStream, request_id: str | None,
        request: ServeRequest, started: float,
    ) -> None:
        """Send a stream with Granian's streaming transport, each chunk as the items come."""
        events = wants_events(environ.get("HTTP_ACCEPT"))
        try:
            first = stream.read(0)  # the first item is there already
            headers = self._front_headers(
                [("Content-Type", content_type(first[0] if first else "", events)), ("Cache-Control", "no-cache")],
                request_id, request.serve_timing,
            )
            transport = proto.response_stream(200, headers)
            if environ["REQUEST_METHOD"] != "HEAD":
                where = f"{request.method} {request.path}"
                await send_stream(transport, stream, first, events, where, self.app.request_timeout_s)
        except Exception:  # noqa: BLE001 - Granian's RSGIProtocolClosed: the client left; the stream is closed
            log.debug("RSGI stream to %s ended early", request.path, exc_info=True)
        finally:
            stream.close()
        if self._access.enabled:
            self._access.write(environ, 200, started, request.serve_endpoint, request.serve_timing, request_id)

    def _enqueue(self, request: ServeRequest, entry: RouteEntry) -> ServeFuture:
        """What :meth:`ServeApp.dispatch_request` does for an endpoint, up to the wait."""
        slo = parse_slo(request)
        method = call_method(request)
        buffer_body(request, self.app.max_body_bytes)
        future = self.app.serve.enqueue(
            entry.endpoint, request=request, method_name=method, slo=slo, shard_key=shard_key(request)
        )
        request.serve_endpoint = entry.endpoint
        return future

    async def _wait(self, future: ServeFuture, endpoint: str, proto: Any) -> None:
        """Until the future is done; past ``request_timeout_s`` it is withdrawn (if still queued) and 504.

        A call not answered within :data:`~.disconnect.WATCH_AFTER_S` also watches for the client
        going away (Granian's ``client_disconnect``), which cancels it (answered 499).

        Raises:
            RequestTimeoutError: no answer within ``request_timeout_s``.
            ClientClosedRequest: the client went away.
        """
        if future.done():
            return
        if self._wakeups is None:
            self._wakeups = Wakeups(asyncio.get_running_loop())
        waiter = self._wakeups.watch(future)
        timeout = self.app.request_timeout_s
        timer = None if timeout is None else self._wakeups.loop.call_later(timeout, _expire, waiter)
        try:
            answered = await _answered_or_gone(waiter, proto)
        except ClientClosedRequest:
            future.cancel()  # withdrawn if queued; a running async call's task is cancelled
            raise
        except asyncio.CancelledError:  # this task was cancelled: withdraw the query
            future.cancel()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if answered or future.done():  # done just as the timer fired: its answer stands
            return
        future.cancel()  # withdrawn if still queued; a running call cannot be, and finishes unheard
        self.app.serve.metrics.front_error(endpoint, "timeout")
        raise RequestTimeoutError(f"no answer from endpoint {endpoint!r} within {timeout} s")

    def _request_id(self, environ: dict[str, Any]) -> str | None:
        """The request's id (``assign_request_id``), or None when ids are off."""
        return None if self._ids is None else assign_request_id(self._ids, environ)

    def _early_id(self, environ: dict[str, Any]) -> str | None:
        """The request id of an answer given before the request was read (a valid client id, else new)."""
        if self._ids is None:
            return None
        given = environ.get(REQUEST_ID_ENVIRON)
        return str(given) if given and valid_request_id(given) else self._ids.new()

    def _refuse(self, proto: Any, environ: dict[str, Any], status: int, message: str, started: float) -> None:
        """Answer a request whose body was not read (408, 413) and close its connection."""
        response = text_response(f"{message}\n", status, _CLOSE)
        answer = (status, response.headers, response.body)
        self._send(proto, environ, answer, self._early_id(environ), None, started)

    def _send(
        self,
        proto: Any,
        environ: dict[str, Any],
        answer: tuple[int, Headers, bytes],
        request_id: str | None,
        request: ServeRequest | None,
        started: float,
    ) -> None:
        """Send the answer with the front's headers (request id, ``Server-Timing``); log it."""
        status, headers, out = answer
        timing = request.serve_timing if request is not None else None
        headers = self._front_headers(headers, request_id, timing)
        proto.response_bytes(status, headers, b"" if environ["REQUEST_METHOD"] == "HEAD" else out)
        if self._access.enabled:
            endpoint = request.serve_endpoint if request is not None else None
            self._access.write(environ, status, started, endpoint, timing, request_id)

    def _front_headers(self, headers: Headers, request_id: str | None, timing: Timing | None) -> Headers:
        """``headers`` with the front's own (request id, ``Server-Timing``) in place of any the response had."""
        if request_id is not None or (timing is not None and self._server_timing):
            headers = [(name, value) for name, value in headers if name.lower() not in _OURS]
            if request_id is not None:
                headers.append((REQUEST_ID_HEADER, request_id))
            if timing is not None and self._server_timing:
                headers.append(("Server-Timing", server_timing(timing)))
        return headers

    async def _in_pool(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)

    def __repr__(self) -> str:
        return f"<RSGIApp {self.app!r}>"


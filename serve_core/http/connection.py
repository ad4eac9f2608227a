"""One connection of the standalone server: timed reads, bounded request bodies, framed responses.

**Deadlines** (real time, on the socket; :class:`TimedReader`). A connection is always in
one :class:`Phase`, and every read waits at most until that phase's deadline:

* ``HEAD``: the whole request head (request line and fields) within ``head_timeout_s``
  of its start: the accept for a new connection, the first byte of the next request for a
  kept one. A trickle of bytes does not extend it.
* ``IDLE``: a kept connection waits ``idle_timeout_s`` for its next request.
* ``BODY``: from the app's first read, the body must arrive within ``body_timeout_s``
  plus one second per ``body_min_rate`` bytes received (Apache's ``mod_reqtimeout``
  model), and no read waits longer than ``idle_timeout_s``.
* ``BUSY``: the app runs and the response is written; each write waits at most
  ``idle_timeout_s`` per 64 KiB for a client that does not read.

``CLOSING``, ``IDLE`` and ``HEAD`` connections can be evicted (:meth:`TimedReader.evict`)
by the server when it needs room for a new one.

**Bodies** (:class:`Body`) cannot be read past their end. A body that fails (malformed
chunking, a deadline, an early end, the client gone) raises a Werkzeug ``HTTPException``
(400/408) into the app, which answers it without a traceback (``ServeApp`` and Flask do),
and the server sends its own answer in place of the app's and closes. **Responses**
(:class:`Response`) are framed by ``Content-Length``, else chunked (HTTP/1.1), else by
closing. How heads and chunked bodies are parsed is in :mod:`.parsing`.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import socket
import threading
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import IO, Any

from werkzeug.exceptions import BadRequest, HTTPException, RequestTimeout, default_exceptions

from ..errors import ValidationError
from .parsing import Malformed

HEAD_TIMEOUT_S = 10.0
"""The whole request head must arrive within this many seconds of its start, else 408."""

BODY_TIMEOUT_S = 10.0
"""A request body gets this many seconds, plus one per :data:`BODY_MIN_RATE` bytes received, else 408."""

BODY_MIN_RATE = 8 * 1024
"""Bytes per second a request body must keep up on average after :data:`BODY_TIMEOUT_S` (10 MiB: 21 min)."""

IDLE_TIMEOUT_S = 30.0
"""A kept connection waits this long for its next request; no single read or write of a body waits longer."""

SKIP_LIMIT = 64 * 1024
"""Unread request body bytes read and dropped after the response to keep the connection; more closes it."""

LINGER_S = 2.0
"""After an answer that leaves input unread, the server reads and drops for this long before closing."""

_LINGER_BYTES = 1 << 20
_WRITE_SLICE = 64 * 1024  # each slice of a response gets its own write timeout


@dataclasses.dataclass(frozen=True, kw_only=True)
class Limits:
    """The deadlines of a connection (see the module docstring); seconds and bytes per second."""

    idle_timeout_s: float = IDLE_TIMEOUT_S
    head_timeout_s: float = HEAD_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S
    body_min_rate: float = BODY_MIN_RATE

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValidationError(f"{field.name} must be a positive number, got {value!r}")


class Phase(enum.Enum):
    """What a connection is doing, which decides its read deadline and whether it may be evicted."""

    HEAD = "reading a request head"
    IDLE = "waiting for the next request"
    BODY = "reading a request body"
    BUSY = "serving a request"
    CLOSING = "closing"
    EVICTED = "evicted"


EVICTABLE = (Phase.CLOSING, Phase.IDLE, Phase.HEAD)
"""Phases a connection may be evicted in, the first ones first."""


class Expired(TimeoutError):
    """A read passed its phase's deadline (or waited ``idle_timeout_s`` for nothing).

    Attributes:
        phase: the phase the connection was in.
        partial: whether any bytes of this phase had arrived (a started head gets a 408).
    """

    def __init__(self, phase: Phase, partial: bool) -> None:
        super().__init__(f"no complete {phase.name.lower()} in time")
        self.phase = phase
        self.partial = partial


class TimedReader(io.RawIOBase):
    """The socket's reads, each bounded by the deadline of the connection's :class:`Phase`.

    A new connection starts in ``HEAD`` at ``accepted``. The handler thread moves it
    between phases with :meth:`enter`; the accepting thread may :meth:`evict` it meanwhile.
    """

    def __init__(self, sock: socket.socket, limits: Limits, accepted: float) -> None:
        super().__init__()
        self._sock = sock
        self._limits = limits
        self._lock = threading.Lock()
        self.phase = Phase.HEAD
        self.since = accepted
        self.received = 0  # bytes received in this phase
        self._deadline = accepted + limits.head_timeout_s

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise Expired(self.phase, self.received > 0)
        self._sock.settimeout(min(left, self._limits.idle_timeout_s))
        try:
            count = self._sock.recv_into(buffer)
        except TimeoutError:
            raise Expired(self.phase, self.received > 0) from None
        if count:
            self._arrived(count)
        return count

    def enter(self, phase: Phase) -> None:
        """Start ``phase`` now.

        Raises:
            ConnectionAbortedError: the connection was evicted.
        """
        now = time.monotonic()
        timeout = {
            Phase.HEAD: self._limits.head_timeout_s,
            Phase.BODY: self._limits.body_timeout_s,
        }.get(phase, self._limits.idle_timeout_s)
        with self._lock:
            if self.phase is Phase.EVICTED:
                raise ConnectionAbortedError("the connection was evicted to make room for a new one")
            self.phase, self.since, self.received, self._deadline = phase, now, 0, now + timeout

    def evict(self) -> bool:
        """End the connection if it is idle or still reading a head; whether it was."""
        with self._lock:
            if self.phase not in EVICTABLE:
                return False
            self.phase = Phase.EVICTED
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # its thread's read returns end-of-stream
        except OSError:
            pass  # already closed by the client
        return True

    def _arrived(self, count: int) -> None:
        if self.phase is Phase.IDLE:
            self.enter(Phase.HEAD)  # the next request started: its head has head_timeout_s from now
        self.received += count
        if self.phase is Phase.BODY:
            limits = self._limits
            self._deadline = self.since + limits.body_timeout_s + self.received / limits.body_min_rate


class SocketWriter(io.BufferedIOBase):
    """Writes to the socket, waiting at most ``timeout`` per 64 KiB for the client to read."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        super().__init__()
        self._sock = sock
        self._timeout = timeout

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._sock.settimeout(self._timeout)
        for start in range(0, len(view), _WRITE_SLICE):
            self._sock.sendall(view[start : start + _WRITE_SLICE])
        return len(view)


def linger(sock: socket.socket, seconds: float = LINGER_S) -> None:
    """Half-close, then read and drop what the client still sends (bounded) before the caller closes.

    Closing a socket with unread input resets the connection, and the client may lose
    the answer it has not read yet (a 400, a 413); this gives it the time to read it.
    """
    deadline = time.monotonic() + seconds
    dropped = 0
    try:
        sock.shutdown(socket.SHUT_WR)
        while dropped < _LINGER_BYTES and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            data = sock.recv(_WRITE_SLICE)
            if not data:
                return
            dropped += len(data)
    except OSError:
        return  # reset, timed out, or already shut by the server's close


# ------------------------------------------------------------------ bodies
def _http_error(status: int, message: str) -> HTTPException:
    return default_exceptions.get(status, BadRequest)(message)


class Body(io.RawIOBase):
    """A request's body as the app reads it: never past its end, ``100 Continue`` sent before the first read.

    The first read starts the ``BODY`` phase of the connection's reader; the end of the
    body starts ``BUSY``. A failed read (malformed chunking, a deadline, an early end)
    is kept in :attr:`failure` and raised, then and on every later read.

    Args:
        stream: the connection's buffered reader, or a :class:`ChunkedBody` over it.
        length: the declared ``Content-Length``; ``None`` for a chunked body (read to its end).
        reader: the connection's timed reader.
        send_continue: sends ``100 Continue``, when the client expects one.
    """

    def __init__(
        self, stream: IO[bytes], length: int | None, reader: TimedReader, send_continue: Callable[[], None] | None
    ) -> None:
        super().__init__()
        self.length = length
        self.failure: HTTPException | None = None
        self._stream = stream
        self._reader = reader
        self._left = length
        self._continue = send_continue
        self._ended = length == 0
        self._started = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.failure is not None:
            raise self.failure
        size = len(buffer) if self._left is None else min(len(buffer), self._left)
        if self._ended or not size:
            return 0
        try:
            data = self._read(size)
        except Expired:
            raise self._fail(RequestTimeout("the request body did not arrive in time")) from None
        except Malformed as exc:
            raise self._fail(_http_error(exc.status, str(exc))) from None
        except OSError:
            raise self._fail(BadRequest("the connection failed while the request body was read")) from None
        buffer[: len(data)] = data
        if self._left is not None:
            self._left -= len(data)
            if not data:
                raise self._fail(BadRequest(f"the request body ended before its Content-Length of {self.length}"))
        self._ended = not data or self._left == 0
        if self._ended:
            self._reader.enter(Phase.BUSY)
        return len(data)

    def _read(self, size: int) -> bytes:
        if not self._started:
            self._started = True
            if self._continue is not None:
                send, self._continue = self._continue, None
                send()
            self._reader.enter(Phase.BODY)
        return self._stream.read(size) or b""

    def _fail(self, failure: HTTPException) -> HTTPException:
        self.failure = failure
        return failure

    @property
    def complete(self) -> bool:
        """Whether the whole body has been read (the next bytes are the next request)."""
        return self.failure is None and (self._left == 0 if self._left is not None else self._ended)

    @property
    def skippable(self) -> bool:
        """Whether what is left can be read and dropped to reach the next request.

        Not when ``100 Continue`` was never sent (the client may be waiting, or not send the
        body at all), nor for the unknown rest of a chunked body or a large rest, nor after a failure.
        """
        if self.complete or self.failure is not None:
            return self.complete
        return self._continue is None and self._left is not None and self._left <= SKIP_LIMIT

    def skip(self) -> bool:
        """Read and drop the rest of the body; whether the connection can serve another request."""
        if not self.skippable:
            return False
        try:
            while self.read(_WRITE_SLICE):
                pass
        except (OSError, HTTPException):
            return False
        return self.complete


# --------------------------------------------------------------- responses
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding"})  # ours to set (PEP 3333)


class Response:
    """One WSGI response (``start_response`` and ``write``) framed so the connection can be kept.

    A declared ``Content-Length`` frames the body (bytes past it are dropped; a shorter body
    closes the connection); without one, an HTTP/1.1 body is chunked and an HTTP/1.0 one ends
    with the connection. The head goes out with the first body bytes, in one write.
    :attr:`close` says, once the head is out, whether the connection ends after the response.

    Args:
        send: writes to the client.
        version: the request's HTTP version.
        method: the request's method (a ``HEAD`` response has no body).
        body: the request's body (a rest that cannot be skipped closes the connection).
        close: the client asked for the connection to end after this response.
        server: the ``Server`` header.
    """

    def __init__(
        self, send: Callable[[bytes], Any], version: str, method: str, body: Body, *, close: bool, server: str
    ) -> None:
        self.close = close
        self.sent = False
        self._send = send
        self._version = version
        self._head_only = method == "HEAD"
        self._body = body
        self._server = server
        self._status: str | None = None
        self._headers: list[tuple[str, str]] = []
        self._chunked = False
        self._left: int | None = None  # body bytes still to send under the declared length

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[..., None]:
        if exc_info is not None and self.sent:
            raise exc_info[1].with_traceback(exc_info[2])
        if exc_info is None and self._status is not None:
            raise RuntimeError("start_response() called twice without exc_info")
        self._status, self._headers = status, headers
        return self.write

    def write(self, data: bytes) -> None:
        head = b"" if self.sent else self._head()
        self._send(head + self._frame(data))

    def finish(self) -> None:
        """End the response once the app's iterable is exhausted."""
        head = b"" if self.sent else self._head()
        end = b"0\r\n\r\n" if self._chunked else b""
        if head or end:
            self._send(head + end)
        if self._left:
            self.close = True  # shorter than its Content-Length: the client waits for more

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
        lines = [f"HTTP/1.1 {self._status}", f"Server: {self._server}", f"Date: {formatdate(usegmt=True)}"]
        length: int | None = None
        for name, value in self._headers:
            key = name.lower()
            if key in _HOP_BY_HOP:
                self.close |= key == "connection" and value.lower() == "close"
                continue
            if key == "content-length":
                length = int(value)
            lines.append(f"{name}: {value}")
        lines += self._framing(int(self._status.split(None, 1)[0]), length)
        self.sent = True
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _framing(self, code: int, length: int | None) -> list[str]:
        """How the body is delimited, and whether the connection stays (decided with the head)."""
        lines: list[str] = []
        if self._head_only or code < 200 or code in (204, 304):
            self._left = 0  # no body, whatever the app yields
        elif length is not None:
            self._left = length
        elif self._version == "HTTP/1.1":
            self._chunked = True
            lines.append("Transfer-Encoding: chunked")
        else:
            self.close = True  # HTTP/1.0 without a length: the body ends with the connection
        if not self._body.skippable:
            self.close = True
        if self.close:
            lines.append("Connection: close")
        elif self._version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        return lines

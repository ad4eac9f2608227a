"""The access log, request ids and the ``Server-Timing`` header of the HTTP front.

One record per HTTP request on the logger ``serve_core.access`` (level INFO), written only
when that logger is enabled for INFO (``serve-core run`` enables it; an embedding app
enables it with its own logging config, e.g. ``logging.basicConfig(level=logging.INFO)``).
Its fields are attributes of the ``LogRecord`` (:data:`FIELDS`); the message is one text
line of them::

    127.0.0.1 "GET /echo" 200 1.92ms endpoint=my_endpoint backend=echo:v1 replica=echo:v1#1 request_id=4f1c…

:class:`JsonFormatter` writes the same record as one JSON object (``serve-core run
--log-format json``).

Request ids: an ``X-Request-ID`` header of at most :data:`MAX_REQUEST_ID_LENGTH` characters
of ``[A-Za-z0-9._:-]`` is kept; a missing (or empty) one is generated; any other is refused
with 400 (the response carries a generated id, so even the refusal can be traced).
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, Any
from urllib.parse import quote

from ..errors import ValidationError
from ..invoke import REQUEST_ID_KEY
from ..queues import Timing

ACCESS_LOGGER = "serve_core.access"
FIELDS = ("remote_addr", "method", "path", "status", "duration_ms", "endpoint", "backend", "replica", "request_id")
"""Attributes of each access log record (``-`` for what does not apply: no endpoint, no replica…)."""

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_ENVIRON = "HTTP_X_REQUEST_ID"
MAX_REQUEST_ID_LENGTH = 128
_VALID_ID = re.compile(rf"[A-Za-z0-9._:\-]{{1,{MAX_REQUEST_ID_LENGTH}}}").fullmatch
LOG_FORMATS = ("text", "json")
WRITE_INTERVAL_S = 0.1
"""How often the access log's writer thread writes the lines queued (they reach the stream within this)."""


class RequestIds:
    """Generates request ids: a random 16-hex-digit prefix per app, then a counter in hex.

    Unique across processes and restarts (64 random bits) and cheaper than a UUID per request.
    """

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._count = iter(range(1, sys.maxsize))

    def new(self) -> str:
        return f"{self._prefix}{next(self._count):016x}"


def valid_request_id(value: str) -> bool:
    """Whether a client's ``X-Request-ID`` is kept (1 to 128 characters of ``[A-Za-z0-9._:-]``)."""
    return _VALID_ID(value) is not None


def assign_request_id(ids: RequestIds, environ: dict[str, Any]) -> str:
    """The client's ``X-Request-ID`` if valid, else a new one; put where the backend finds it.

    Raises:
        ValidationError: the client's id is too long or has other characters (400).
    """
    given = environ.get(REQUEST_ID_ENVIRON)
    if given:
        if not valid_request_id(given):
            raise ValidationError(
                f"{REQUEST_ID_HEADER} must be 1 to {MAX_REQUEST_ID_LENGTH} characters of A-Z a-z 0-9 . _ : -"
                f" (got {len(given)} characters); send a valid one or none (the server then makes one)"
            )
        request_id = str(given)
    else:
        request_id = environ[REQUEST_ID_ENVIRON] = ids.new()
    environ[REQUEST_ID_KEY] = request_id
    return request_id


def server_timing(timing: Timing) -> str:
    """The ``Server-Timing`` header value of a query's timing (durations in milliseconds)."""
    return (
        f"queue;dur={timing.queue_s * 1e3:.3f}, batch_wait;dur={timing.batch_wait_s * 1e3:.3f}, "
        f"execution;dur={timing.execution_s * 1e3:.3f}, backend;desc={_quoted(timing.backend)}"
    )


@functools.lru_cache(maxsize=256)
def _quoted(text: str) -> str:
    """A header quoted-string; characters outside printable ASCII are percent-encoded (UTF-8)."""
    if not all(" " <= char <= "~" for char in text):
        text = quote(text, safe="".join(map(chr, range(0x20, 0x7F))))  # only what is not printable ASCII
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class AccessLog:
    """Writes the access records of one app.

    When the logger's only handler is the one :func:`configure_access_log` installed (the
    ``serve-core run`` setup), a request's line is formatted and written directly: no
    ``LogRecord``, no handler chain, a few microseconds. With any other setup (a filter,
    handlers of the application's, ``caplog``), a ``LogRecord`` carrying :data:`FIELDS` as
    attributes goes through the logger as usual (built directly: ``Logger.info`` would also look
    up the caller's frame, which says nothing here).
    """

    def __init__(self) -> None:
        self.logger = logging.getLogger(ACCESS_LOGGER)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def write(
        self,
        environ: dict[str, Any],
        status: int,
        started: float,
        endpoint: str | None,
        timing: Timing | None,
        request_id: str | None,
    ) -> None:
        """Log one request that started at ``started`` (``time.perf_counter()``)."""
        duration_ms = round((time.perf_counter() - started) * 1e3, 3)
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        backend, replica = (timing.backend, timing.replica) if timing is not None else ("-", "-")
        values = (
            environ.get("REMOTE_ADDR") or "-", environ.get("REQUEST_METHOD", "-"), path, status, duration_ms,
            endpoint or "-", backend, replica, request_id or "-",
        )
        handler = self._direct()
        if handler is not None:
            handler.write_line(time.time(), values)
            return
        record = logging.LogRecord(ACCESS_LOGGER, logging.INFO, __file__, 0, _message(values), None, None, "access")
        record.__dict__.update(zip(FIELDS, values))
        self.logger.handle(record)

    def _direct(self) -> AccessHandler | None:
        """Our handler, when it alone would see the record (so it may skip the ``LogRecord``)."""
        logger = self.logger
        handlers = logger.handlers
        if len(handlers) != 1 or logger.propagate or logger.filters:
            return None
        handler = handlers[0]
        if type(handler) is not AccessHandler or handler.filters or handler.level > logging.INFO:
            return None
        return handler


def _message(values: tuple[Any, ...]) -> str:
    remote, method, path, status, duration_ms, endpoint, backend, replica, request_id = values
    return (
        f'{remote} "{method} {path}" {status} {duration_ms:.2f}ms endpoint={endpoint} '
        f"backend={backend} replica={replica} request_id={request_id}"
    )


class _Clock:
    """The text of a record's time, formatted once per second (``strftime`` is slow)."""

    def __init__(self, converter: Callable[..., time.struct_time], datefmt: str) -> None:
        self._converter, self._datefmt = converter, datefmt
        self._second, self._text = -1, ""

    def text(self, created: float) -> str:
        """``<date and time>`` and ``<milliseconds>`` of ``created`` (seconds since the epoch)."""
        second = int(created)
        if second != self._second:  # formatters run under their handler's lock: no race
            self._second, self._text = second, time.strftime(self._datefmt, self._converter(created))
        return self._text

    @staticmethod
    def millis(created: float) -> int:
        return int((created - int(created)) * 1000)


class TextFormatter(logging.Formatter):
    """``<time>,<ms> <message>`` (the default ``asctime`` format), with the time text cached per second."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(message)s")
        self._clock = _Clock(self.converter, "%Y-%m-%d %H:%M:%S")

    def line(self, created: float, values: tuple[Any, ...]) -> str:
        """An access record's line from its :data:`FIELDS` values."""
        return f"{self._clock.text(created)},{_Clock.millis(created):03d} {_message(values)}"

    def format(self, record: logging.LogRecord) -> str:
        text = f"{self._clock.text(record.created)},{int(record.msecs):03d} {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and the access fields when present."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock(self.converter, "%Y-%m-%dT%H:%M:%S")

    def line(self, created: float, values: tuple[Any, ...]) -> str:
        """An access record's object from its :data:`FIELDS` values."""
        out: dict[str, Any] = {
            "time": f"{self._clock.text(created)}.{_Clock.millis(created):03d}",
            "level": "INFO",
            "logger": ACCESS_LOGGER,
        }
        out.update(zip(FIELDS, values))
        return json.dumps(out, ensure_ascii=False)

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": f"{self._clock.text(record.created)}.{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
        }
        if hasattr(record, "request_id"):
            fields = record.__dict__
            out.update((name, fields[name]) for name in FIELDS)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class AccessHandler(logging.StreamHandler):
    """The handler :func:`configure_access_log` installs: lines are written in batches, off the request.

    A request only formats its line and appends it to a queue; a writer thread (started with
    the first line) writes what has queued every :data:`WRITE_INTERVAL_S`, in one write and one
    flush. A write per request would be a system call per request, and each one hands the GIL
    over: under concurrent requests that cost a third of the throughput. :meth:`flush` (also
    called by ``logging.shutdown()`` at exit) and :meth:`close` write what is left at once.
    """

    def __init__(self, stream: IO[str], formatter: TextFormatter | JsonFormatter) -> None:
        super().__init__(stream)
        self.setFormatter(formatter)
        self.line = formatter.line
        self._pending: collections.deque[str] = collections.deque()  # append/popleft are atomic
        self._stopping = threading.Event()
        self._writer: threading.Thread | None = None
        self._starting = threading.Lock()

    def write_line(self, created: float, values: tuple[Any, ...]) -> None:
        """Queue an access record given by its :data:`FIELDS` values (what :meth:`emit` does for a record)."""
        self._pending.append(self.line(created, values))
        if self._writer is None:
            self._start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._pending.append(self.format(record))
        except Exception:  # noqa: BLE001 - logging's contract: report, never raise
            self.handleError(record)
            return
        if self._writer is None:
            self._start()

    def flush(self) -> None:
        """Write what is queued now."""
        lines: list[str] = []
        pending = self._pending
        while pending:
            lines.append(pending.popleft())
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            try:
                if lines:
                    self.stream.write(self.terminator.join(lines) + self.terminator)
                if self.stream and hasattr(self.stream, "flush"):
                    self.stream.flush()
            except Exception:  # noqa: BLE001 - a failing log stream must not fail the server
                self.handleError(logging.makeLogRecord({"msg": f"{len(lines)} access log lines lost"}))

    def close(self) -> None:
        self._stopping.set()
        writer = self._writer
        if writer is not None and writer is not threading.current_thread():
            writer.join(WRITE_INTERVAL_S * 10)
        self.flush()
        super().close()

    def _start(self) -> None:
        with self._starting:
            if self._writer is None and not self._stopping.is_set():
                self._writer = threading.Thread(target=self._write_on, name="serve-access-log", daemon=True)
                self._writer.start()

    def _write_on(self) -> None:
        while not self._stopping.wait(WRITE_INTERVAL_S):
            if self._pending:
                self.flush()


def configure_access_log(log_format: str = "text", stream: IO[str] | None = None) -> logging.Handler:
    """Write the access log to ``stream`` (stderr by default), as text lines or JSON objects.

    What ``serve-core run --log-format`` does; idempotent (a handler this function added before
    is closed and replaced). Lines reach the stream in batches, within
    :data:`WRITE_INTERVAL_S` (:class:`AccessHandler`). Returns the handler.

    Raises:
        ValueError: ``log_format`` is neither ``"text"`` nor ``"json"``.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    logger = logging.getLogger(ACCESS_LOGGER)
    for old in list(_ours(logger)):
        logger.removeHandler(old)
        old.close()
    formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    handler = AccessHandler(stream if stream is not None else sys.stderr, formatter)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # one line per request even when the root logger has handlers too
    return handler


def _ours(logger: logging.Logger) -> Iterator[logging.Handler]:
    return (handler for handler in logger.handlers if isinstance(handler, AccessHandler))

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

import functools
import json
import logging
import re
import secrets
import sys
import time
from collections.abc import Iterator
from typing import IO, Any
from urllib.parse import quote

from ..queues import Timing

ACCESS_LOGGER = "serve_core.access"
FIELDS = ("remote_addr", "method", "path", "status", "duration_ms", "endpoint", "backend", "replica", "request_id")
"""Attributes of each access log record (``-`` for what does not apply: no endpoint, no replica…)."""

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_ENVIRON = "HTTP_X_REQUEST_ID"
MAX_REQUEST_ID_LENGTH = 128
_VALID_ID = re.compile(rf"[A-Za-z0-9._:\-]{{1,{MAX_REQUEST_ID_LENGTH}}}").fullmatch
LOG_FORMATS = ("text", "json")


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
    """Writes the access records of one app."""

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
        fields = {
            "remote_addr": environ.get("REMOTE_ADDR") or "-",
            "method": environ.get("REQUEST_METHOD", "-"),
            "path": environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""),
            "status": status,
            "duration_ms": round((time.perf_counter() - started) * 1e3, 3),
            "endpoint": endpoint or "-",
            "backend": timing.backend if timing is not None else "-",
            "replica": timing.replica if timing is not None else "-",
            "request_id": request_id or "-",
        }
        self.logger.info(
            '%s "%s %s" %d %.2fms endpoint=%s backend=%s replica=%s request_id=%s',
            *fields.values(),
            extra=fields,
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and the access fields when present."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
        }
        if hasattr(record, "request_id"):
            out.update((name, getattr(record, name)) for name in FIELDS)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_access_log(log_format: str = "text", stream: IO[str] | None = None) -> logging.Handler:
    """Write the access log to ``stream`` (stderr by default), as text lines or JSON objects.

    What ``serve-core run --log-format`` does; idempotent per stream (a handler this function
    added before is replaced). Returns the handler.

    Raises:
        ValueError: ``log_format`` is neither ``"text"`` nor ``"json"``.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    logger = logging.getLogger(ACCESS_LOGGER)
    for old in list(_ours(logger)):
        logger.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter("%(asctime)s %(message)s"))
    handler.serve_core_access = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # one line per request even when the root logger has handlers too
    return handler


def _ours(logger: logging.Logger) -> Iterator[logging.Handler]:
    return (handler for handler in logger.handlers if getattr(handler, "serve_core_access", False))

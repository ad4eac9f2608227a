"""Encoding backend results as responses, and mapping errors to responses (the one place).

Results (as in the original, plus ``Response`` pass-through):

==========================  ===========================  ==============================
returned value              body                         Content-Type
==========================  ===========================  ==============================
``None``                    empty                        ``text/plain``
``bytes``                   raw                          ``text/plain``
``str``                     UTF-8                        ``text/plain; charset=utf-8``
Werkzeug/Flask ``Response`` unchanged                    its own
anything else               JSON (numpy → lists/numbers) ``application/json``
==========================  ===========================  ==============================

Errors: a :class:`~serve_core.errors.ServeError` answers with its ``status_code`` and its
message as plain text (``Allow`` on 405; ``Retry-After`` on a ``BackPressureError``'s 503:
its ``retry_after_s`` hint, estimated by the runtime from the queue and the service rate,
rounded up to whole seconds, at least 1). Anything else — the backend raised, or an
internal failure — is a 500 with a short message and an error id that is logged with the
traceback; the traceback is in the body only in debug mode.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import traceback
from collections.abc import Callable
from typing import Any

from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wrappers import Response

from .. import recent_errors
from ..errors import BackPressureError, MethodNotAllowedError, ServeError, ServeStateError

log = logging.getLogger("serve_core.http")

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and numpy scalars
        return value.tolist()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, BaseException):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return list(value)
    raise TypeError(f"a result of type {type(value).__name__} cannot be encoded as JSON")


def json_body(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON (numpy arrays as lists, numpy scalars as numbers)."""
    return json.dumps(value, default=_json_default, ensure_ascii=False).encode("utf-8")


class PlainResponse:
    """A minimal WSGI response (status, headers, one body) for encoded results and errors.

    Werkzeug's ``Response`` is general (streaming, conditional requests, header
    rewriting); results and errors need none of it, and this path runs once per request.
    Like Werkzeug's, it sends the headers but no body for ``HEAD``.
    """

    __slots__ = ("status_code", "headers", "body")

    def __init__(
        self, body: bytes, content_type: str, status: int = 200, extra: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.status_code = status
        self.body = body
        self.headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), *extra]

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response(_status_line(self.status_code), self.headers)
        if environ.get("REQUEST_METHOD") == "HEAD":
            return []
        return [self.body]

    def __repr__(self) -> str:
        return f"<PlainResponse {self.status_code} {self.headers[0][1]} {len(self.body)} bytes>"


@functools.lru_cache(maxsize=64)
def _status_line(code: int) -> str:
    return f"{code} {HTTP_STATUS_CODES.get(code, 'Unknown')}"


def json_response(value: Any, status: int = 200) -> PlainResponse:
    return PlainResponse(json_body(value), JSON, status)


def text_response(text: str, status: int = 200, extra: tuple[tuple[str, str], ...] = ()) -> PlainResponse:
    return PlainResponse(text.encode("utf-8"), TEXT, status, extra)


def encode_result(value: Any) -> Response | PlainResponse:
    """The response for a backend's return value (see the module docstring)."""
    if isinstance(value, bytes):
        return PlainResponse(value, "text/plain")
    if isinstance(value, str):
        return PlainResponse(value.encode("utf-8"), TEXT)
    if value is None:
        return PlainResponse(b"", "text/plain")
    if isinstance(value, Response):
        return value
    return PlainResponse(json_body(value), JSON)


def error_response(exc: BaseException, *, debug: bool, where: str) -> PlainResponse:
    """The response for an exception raised while serving ``where`` (e.g. ``"GET /echo"``)."""
    if isinstance(exc, ServeStateError):
        return text_response(f"service unavailable: {exc}\n", 503)
    if isinstance(exc, ServeError) and exc.status_code != 500:
        extra: tuple[tuple[str, str], ...] = ()
        if isinstance(exc, MethodNotAllowedError):
            extra = (("Allow", ", ".join(exc.allowed)),)
        elif isinstance(exc, BackPressureError):
            extra = (("Retry-After", str(max(1, math.ceil(exc.retry_after_s)))),)
        return text_response(f"{exc}\n", exc.status_code, extra)
    if isinstance(exc, HTTPException) and exc.code is not None and exc.code < 500:
        return text_response(f"{exc.description}\n", exc.code)
    return internal_error(exc, debug=debug, where=where)


def internal_error(exc: BaseException, *, debug: bool, where: str) -> PlainResponse:
    """A 500 with an error id; the traceback goes to the log (and the body in debug mode)."""
    error_id = recent_errors.error_id(exc)  # the id the dashboard's recent errors show for it too
    log.error("%s failed (error id %s)", where, error_id, exc_info=exc)
    body = f"Internal Server Error (error id {error_id}); the server log has the details\n"
    if debug:
        body += "".join(traceback.format_exception(exc))
    return text_response(body, 500)

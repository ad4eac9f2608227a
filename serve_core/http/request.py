"""From a WSGI request to what the router needs: a buffered request, an SLO, a call method.

The request handed to the backend is a Werkzeug ``Request`` (the base class of Flask's),
read completely into memory *before* it is enqueued: the replica may run on another
thread, process or machine after the WSGI call has returned, so it must not depend on
the server's input stream. For the same reason :class:`ServeRequest` pickles to a
self-contained copy (the plain-data part of the environ plus the body).
"""

from __future__ import annotations

import io
import sys
from typing import Any

from werkzeug.wrappers import Request
from werkzeug.wsgi import get_input_stream

from ..errors import MethodNotFoundError, PayloadTooLargeError, ValidationError
from ..invoke import is_public_method
from ..queues import Timing
from ..slo import NO_SLO, SLO

CALL_METHOD_KEY = "HTTP_X_SERVE_CALL_METHOD"  # the X-SERVE-CALL-METHOD header in the environ
SHARD_KEY_KEY = "HTTP_X_SERVE_SHARD_KEY"  # the X-SERVE-SHARD-KEY header
MAX_SHARD_KEY_LENGTH = 256
SLO_PARAMS = ("relative_slo_ms", "absolute_slo_ms")
_PLAIN = (str, bytes, int, float, bool, tuple)
_CHUNK = 64 * 1024


class ServeRequest(Request):
    """A Werkzeug request whose body is buffered and which survives pickling.

    The front notes on it what its response and access log need: the endpoint it was
    routed to and the :class:`~serve_core.queues.Timing` of its call (neither is pickled).
    """

    serve_endpoint: str | None = None
    serve_timing: Timing | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        environ = {k: v for k, v in self.environ.items() if isinstance(v, _PLAIN)}
        return (_rebuild, (environ, self.get_data()))


def _rebuild(environ: dict[str, Any], body: bytes) -> ServeRequest:
    environ["wsgi.input"] = io.BytesIO(body)
    environ["wsgi.errors"] = sys.stderr
    request = ServeRequest(environ)
    request.get_data()
    return request


def buffer_body(request: Request, limit: int) -> None:
    """Read the whole body into memory, so the request no longer depends on the server.

    The body replaces ``wsgi.input`` (``.data``, ``.get_json()``, ``.form`` read it later).

    Raises:
        PayloadTooLargeError: the declared or actual length (chunked bodies) passes ``limit``.
    """
    environ = request.environ
    if not environ.get("CONTENT_LENGTH") and "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", ""):
        return  # no body (HTTP/1.1: neither Content-Length nor chunked); nothing to read
    length = request.content_length
    if length is not None:
        check_body_length(length, limit)
    stream = get_input_stream(environ, max_content_length=None)
    chunks: list[bytes] = []
    size = 0
    while chunk := stream.read(min(_CHUNK, limit + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"request body is larger than the limit of {limit} bytes")
    body = b"".join(chunks)
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    request.get_data()


def check_body_length(length: int, limit: int) -> None:
    """Refuse a declared body length past the limit, before reading any of the body.

    The standalone server calls it too, to answer 413 before the app is called.

    Raises:
        PayloadTooLargeError: ``length`` is larger than ``limit``.
    """
    if length > limit:
        raise PayloadTooLargeError(f"request body of {length} bytes is larger than the limit of {limit}")


def parse_slo(request: Request) -> SLO:
    """The SLO from the ``relative_slo_ms`` / ``absolute_slo_ms`` query parameters.

    Raises:
        ValidationError: a parameter repeated, negative, not a number, or both given.
    """
    if not request.environ.get("QUERY_STRING"):
        return NO_SLO
    args = request.args
    values: dict[str, Any] = {}
    for name in SLO_PARAMS:
        given = args.getlist(name)
        if len(given) > 1:
            raise ValidationError(f"query parameter {name} was given {len(given)} times; give it once")
        values[name] = given[0] if given else None
    if values["relative_slo_ms"] is None and values["absolute_slo_ms"] is None:
        return NO_SLO
    return SLO.parse(**values)


def call_method(request: Request) -> str:
    """The backend method named by the ``X-SERVE-CALL-METHOD`` header (default ``__call__``).

    Raises:
        MethodNotFoundError: the name is private (leading underscore) or empty; checked
            here so that such a request never reaches a replica.
    """
    method = request.environ.get(CALL_METHOD_KEY)
    if method is None:
        return "__call__"
    method = method.strip()
    if not is_public_method(method):
        raise MethodNotFoundError(f"method {method!r} is not public and cannot be called over HTTP")
    return method


def shard_key(request: Request) -> str | None:
    """The ``X-SERVE-SHARD-KEY`` header: calls with the same key go to the same backend of a split.

    Raises:
        ValidationError: longer than :data:`MAX_SHARD_KEY_LENGTH` characters.
    """
    key = request.environ.get(SHARD_KEY_KEY)
    if key is None:
        return None
    if len(key) > MAX_SHARD_KEY_LENGTH:
        raise ValidationError(f"X-SERVE-SHARD-KEY is longer than {MAX_SHARD_KEY_LENGTH} characters")
    return str(key)

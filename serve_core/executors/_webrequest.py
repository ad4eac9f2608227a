"""Web requests across a process boundary: a picklable form of a Werkzeug request.

A Werkzeug ``Request`` holds its WSGI environ, whose input stream, error stream and
back-references cannot be pickled. Executors that run replicas in another process
send a :class:`WireRequest` instead (the environ's plain values plus the body bytes)
and rebuild a ``Request`` on the other side, so the backend sees the same URL,
headers, query string and body.
"""

from __future__ import annotations

import dataclasses
import io
import sys
from typing import Any

from werkzeug.wrappers import Request

from ..invoke import Call

# Environ values that survive pickling unchanged; everything else (streams, callables,
# Werkzeug's back-reference to the request object) is dropped.
_PLAIN = (str, bytes, int, float, bool, type(None))

# Keys rebuilt on the receiving side from the body bytes.
_REBUILT = frozenset({"wsgi.input", "wsgi.errors", "CONTENT_LENGTH", "HTTP_TRANSFER_ENCODING"})


@dataclasses.dataclass(frozen=True, slots=True)
class WireRequest:
    """A web request reduced to picklable parts."""

    environ: dict[str, Any]
    body: bytes

    @classmethod
    def from_request(cls, request: Request) -> WireRequest:
        """Capture the environ's plain values and the whole body (read once, cached)."""
        body = request.get_data(cache=True)
        environ = {k: v for k, v in request.environ.items() if k not in _REBUILT and _is_plain(v)}
        return cls(environ, body)

    def to_request(self) -> Request:
        """Rebuild a Werkzeug ``Request`` whose body stream yields the captured bytes."""
        environ = dict(self.environ)
        environ["wsgi.input"] = io.BytesIO(self.body)
        environ["wsgi.errors"] = sys.stderr
        environ["wsgi.input_terminated"] = True
        environ["CONTENT_LENGTH"] = str(len(self.body))
        return Request(environ)


def _is_plain(value: Any) -> bool:
    if isinstance(value, tuple):
        return all(isinstance(item, _PLAIN) for item in value)
    return isinstance(value, _PLAIN)


def pack_call(call: Call) -> Call:
    """Replace the Werkzeug requests of a web call by :class:`WireRequest` (parent side)."""
    if not call.web or not any(isinstance(r, Request) for r in call.requests):
        return call
    requests = tuple(WireRequest.from_request(r) if isinstance(r, Request) else r for r in call.requests)
    return dataclasses.replace(call, requests=requests)


def unpack_call(call: Call) -> Call:
    """Turn :class:`WireRequest` objects back into Werkzeug requests (replica side)."""
    if not call.web or not any(isinstance(r, WireRequest) for r in call.requests):
        return call
    requests = tuple(r.to_request() if isinstance(r, WireRequest) else r for r in call.requests)
    return dataclasses.replace(call, requests=requests)

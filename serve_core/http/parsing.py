"""The syntax of HTTP/1.1 requests (RFC 9112), checked strictly: request heads, field lines, chunked bodies.

:func:`read_head` reads one head: ``METHOD SP target SP HTTP/1.x`` (single spaces; the
target a path, an absolute http(s) URL, or ``*`` for ``OPTIONS``; only HTTP/1.0 and
HTTP/1.1, as hyper does), then field lines ``name: value`` with a token name (no
whitespace before the colon), no obs-fold, no control characters in the value. The head
must say unambiguously where the body ends: one non-negative decimal ``Content-Length``;
``Transfer-Encoding`` only in HTTP/1.1, never with ``Content-Length``, ending in
``chunked`` and applying it once (another coding before it is 501 Not Implemented, RFC
9112 §6.1); one ``Host``, required in HTTP/1.1 (§3.2). Anything else raises
:class:`Malformed` with the status the server answers before it closes: 400, 414 (request
line), 431 (head size or field count), 501. Up to eight empty lines before a request line
are ignored (§2.2).

:class:`ChunkedBody` decodes a chunked body (§7.1): sizes in hex (at most 16 digits),
chunk extensions checked against the grammar and ignored, trailer fields checked like
header fields and dropped.

The checks are small on purpose: the stdlib's parser is lenient where a proxy in front
could read the same bytes differently (it ends the headers silently at a line like
``Content-Length : 5``, splits lines on a bare CR, takes ``HTTP/1.10`` and HTTP/0.9
lines), and Werkzeug's de-chunker takes neither extensions nor trailers.
"""

from __future__ import annotations

import dataclasses
import http.client
import io
import re
from typing import IO, Any

from werkzeug.http import HTTP_STATUS_CODES

MAX_REQUEST_LINE = 8 * 1024
"""Longest request line (414 past it)."""

MAX_HEAD_BYTES = 64 * 1024
"""Largest request head, request line included (431 past it); also the limit of a chunked body's trailer."""

MAX_FIELDS = 100
"""Most header (or trailer) fields of a request (431 past it)."""

_MAX_EMPTY_LINES = 8  # empty lines before a request line, ignored (RFC 9112 §2.2)
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_METHOD = re.compile(_TOKEN)
_TARGET = re.compile(rb"[\x21-\x7e\x80-\xff]+")
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_ABSOLUTE = re.compile(rb"https?://", re.IGNORECASE)
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(.*?)[ \t]*\r?\n", re.DOTALL)
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_LENGTH = re.compile(r"[0-9]{1,18}")
_HOST = re.compile(r"(?:\[[0-9A-Za-z:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?")
_MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions
_EXTENSION = rb"[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?"
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:" + _EXTENSION + rb")*\r?\n")


class Malformed(ValueError):
    """The request breaks HTTP/1.1's syntax (RFC 9112); the server answers ``status`` and closes."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Head:
    """A request head that passed :func:`read_head`.

    Attributes:
        length: the declared ``Content-Length`` (0 without one); ``None`` for a chunked body.
        close: the connection ends after this request (asked, or HTTP/1.0 without keep-alive).
    """

    method: str
    target: str
    version: str
    headers: http.client.HTTPMessage
    length: int | None
    close: bool
    expects_continue: bool

    @property
    def chunked(self) -> bool:
        return self.length is None


def read_head(rfile: IO[bytes]) -> Head | None:
    """Read and check one request head; ``None`` when the connection ends before a request.

    Raises:
        Malformed: the head breaks RFC 9112 (see the module docstring).
        Expired: the head did not arrive in time.
    """
    line = _request_line(rfile)
    if line is None:
        return None
    method, target, version = parse_request_line(line)
    headers = read_fields(rfile, MAX_HEAD_BYTES - len(line), "request head")
    length = _framing(headers, version)
    _check_host(headers, version)
    tokens = {token.strip().lower() for value in headers.get_all("Connection") or () for token in value.split(",")}
    close = "close" in tokens or (version == "HTTP/1.0" and "keep-alive" not in tokens)
    expects = version == "HTTP/1.1" and headers.get("Expect", "").lower() == "100-continue"
    return Head(method, target, version, headers, length, close, expects)


def _request_line(rfile: IO[bytes]) -> bytes | None:
    for _ in range(_MAX_EMPTY_LINES + 1):
        line = rfile.readline(MAX_REQUEST_LINE + 1)
        if line not in (b"\r\n", b"\n"):
            break
    if not line:
        return None
    if len(line) > MAX_REQUEST_LINE:
        raise Malformed(f"the request line is longer than {MAX_REQUEST_LINE} bytes", 414)
    if not line.endswith(b"\n"):
        raise Malformed("the connection ended inside the request line")
    return line


def parse_request_line(line: bytes) -> tuple[str, str, str]:
    """``METHOD SP target SP HTTP/1.x CRLF`` (or LF) into its three parts.

    Raises:
        Malformed: anything else: other spacing, an HTTP/0.9 line, a method that is not a
            token, a target with spaces or control characters or of no known form, a
            version other than ``HTTP/1.0`` and ``HTTP/1.1``.
    """
    parts = line.rstrip(b"\n").removesuffix(b"\r").split(b" ")
    if len(parts) != 3:
        raise Malformed("malformed request line; expected METHOD TARGET HTTP/1.1, single spaces")
    method, target, version = parts
    if not _METHOD.fullmatch(method):
        raise Malformed("malformed request method")
    if not _TARGET.fullmatch(target):
        raise Malformed("malformed request target")
    if not _VERSION.fullmatch(version):
        raise Malformed("malformed HTTP version; expected HTTP/1.1 or HTTP/1.0")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise Malformed(f"{version.decode()} is not supported; use HTTP/1.1 or HTTP/1.0")
    if not (target.startswith(b"/") or _ABSOLUTE.match(target) or (target == b"*" and method == b"OPTIONS")):
        raise Malformed("the request target must be a path ('/...'), an absolute http(s) URL, or * for OPTIONS")
    return method.decode("ascii"), target.decode("latin-1"), version.decode("ascii")


def read_fields(rfile: IO[bytes], budget: int, what: str) -> http.client.HTTPMessage:
    """Field lines up to the empty line that ends them (a head's headers, a chunked body's trailer).

    Raises:
        Malformed: a line that is not ``token: value`` (whitespace before the colon,
            obs-fold, control characters), the connection ended, or more than
            :data:`MAX_FIELDS` fields or ``budget`` bytes (431).
    """
    fields = http.client.HTTPMessage()
    for _ in range(MAX_FIELDS + 1):
        line = rfile.readline(budget + 1)
        if len(line) > budget:
            raise Malformed(f"the {what} is larger than its limit", 431)
        budget -= len(line)
        if line in (b"\r\n", b"\n"):
            return fields
        match = _FIELD.fullmatch(line)
        if match is None or _BAD_VALUE.search(match[2]):
            problem = "ended early" if not line.endswith(b"\n") else f"has a malformed field line ({len(fields) + 1})"
            raise Malformed(f"the {what} {problem}")
        fields[match[1].decode("ascii")] = match[2].decode("latin-1")
    raise Malformed(f"the {what} has more than {MAX_FIELDS} fields", 431)


def _framing(headers: http.client.HTTPMessage, version: str) -> int | None:
    """The declared body length (0 without a body), ``None`` for a chunked body."""
    codings = headers.get_all("Transfer-Encoding")
    lengths = headers.get_all("Content-Length")
    if codings is not None:
        if version == "HTTP/1.0":
            raise Malformed("Transfer-Encoding is not allowed in an HTTP/1.0 request")
        if lengths is not None:
            raise Malformed("a request with both Transfer-Encoding and Content-Length is ambiguous; send one")
        _check_codings(codings)
        return None
    if lengths is None:
        return 0
    if len(lengths) > 1:
        raise Malformed(f"Content-Length was given {len(lengths)} times; give it once")
    if not _LENGTH.fullmatch(lengths[0]):
        raise Malformed("Content-Length must be one non-negative decimal number (at most 18 digits)")
    return int(lengths[0])


def _check_codings(values: list[str]) -> None:
    codings = [coding.strip(" \t").lower() for value in values for coding in value.split(",")]
    codings = [coding for coding in codings if coding]
    if not codings or codings[-1] != "chunked":
        raise Malformed("the last transfer coding of a request must be chunked")
    if "chunked" in codings[:-1]:
        raise Malformed("chunked was applied more than once")
    if len(codings) > 1:  # RFC 9112 §6.1: a coding the server does not understand is 501
        raise Malformed("transfer codings other than chunked are not implemented", 501)


def _check_host(headers: http.client.HTTPMessage, version: str) -> None:
    hosts = headers.get_all("Host")
    if hosts is None:
        if version == "HTTP/1.1":
            raise Malformed("an HTTP/1.1 request needs a Host header")
    elif len(hosts) > 1:
        raise Malformed(f"Host was given {len(hosts)} times; give it once")
    elif not _HOST.fullmatch(hosts[0]):
        raise Malformed("malformed Host header")


def answer(status: int, message: str, *, extra: str = "") -> bytes:
    """A complete plain-text response that closes the connection (the server's own refusals)."""
    body = f"{message}\n".encode()
    head = (
        f"HTTP/1.1 {status} {HTTP_STATUS_CODES.get(status, 'Error')}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n{extra}Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


class ChunkedBody(io.RawIOBase):
    """A chunked request body, decoded (RFC 9112 §7.1).

    Chunk extensions are checked against the grammar and ignored; trailer fields are
    checked like header fields and dropped.

    Raises:
        Malformed: from reads, on a malformed size line or chunk end, or an early end.
    """

    def __init__(self, rfile: io.BufferedReader[Any]) -> None:
        super().__init__()
        self._rfile = rfile
        self._left = 0  # bytes left in the current chunk
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._done or not len(buffer):
            return 0
        if not self._left:
            self._left = self._size()
            if not self._left:
                read_fields(self._rfile, MAX_HEAD_BYTES, "trailer")
                self._done = True
                return 0
        count = self._rfile.readinto1(memoryview(buffer)[: self._left])
        if not count:
            raise Malformed("the request body ended inside a chunk")
        self._left -= count
        if not self._left and self._rfile.readline(3) not in (b"\r\n", b"\n"):
            raise Malformed("a chunk's data must be followed by CRLF")
        return count

    def _size(self) -> int:
        line = self._rfile.readline(_MAX_CHUNK_LINE + 1)
        match = _CHUNK_LINE.fullmatch(line)
        if match is None:
            problem = "ended before its last chunk" if not line else "has a malformed chunk size line"
            raise Malformed(f"the chunked request body {problem}")
        return int(match[1], 16)

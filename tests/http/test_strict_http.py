"""Strict HTTP/1.1 on the standalone server (RFC 9112), each case a raw-socket exchange.

A malformed request gets its 4xx (or 501) with ``Connection: close`` and the connection
ends; nothing after it on the connection is served (the smuggling case), nothing is
logged with a traceback, and no body carries one. Valid but unusual requests (chunk
extensions, trailers, OWS around a length, bare LF line ends, a leading empty line) are
served.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from serve_core import Serve
from serve_core.http.server import HTTPServer

from .helpers import Servers, Wire

ECHO = b"POST /echo HTTP/1.1\r\nHost: test\r\n"


def _post(*fields: bytes, body: bytes = b"") -> bytes:
    """``POST /echo`` with these field lines (each without its CRLF), then the body."""
    return ECHO + b"".join(field + b"\r\n" for field in fields) + b"\r\n" + body


CHUNKED = b"Transfer-Encoding: chunked"

MALFORMED: dict[str, tuple[int, bytes]] = {
    # Content-Length: one non-negative decimal number, given once
    "length-negative": (400, _post(b"Content-Length: -1", body=b"hello")),
    "length-word": (400, _post(b"Content-Length: abc", body=b"hello")),
    "length-exponent": (400, _post(b"Content-Length: 1e3", body=b"hello")),
    "length-list": (400, _post(b"Content-Length: 5, 5", body=b"hello")),
    "length-plus": (400, _post(b"Content-Length: +5", body=b"hello")),
    "length-hex": (400, _post(b"Content-Length: 0x5", body=b"hello")),
    "length-decimal-point": (400, _post(b"Content-Length: 5.0", body=b"hello")),
    "length-empty": (400, _post(b"Content-Length: ", body=b"hello")),
    "length-arabic-digit": (400, _post("Content-Length: \u0665".encode(), body=b"hello")),
    "length-19-digits": (400, _post(b"Content-Length: 1234567890123456789", body=b"hello")),
    "length-two-different": (400, _post(b"Content-Length: 5", b"Content-Length: 6", body=b"hello!")),
    "length-two-same": (400, _post(b"Content-Length: 5", b"Content-Length: 5", body=b"hello")),
    "length-space-before-colon": (400, _post(b"Content-Length : 5", body=b"hello")),
    # Transfer-Encoding: chunked only, last, once, never with Content-Length nor in HTTP/1.0
    "te-with-length": (400, _post(CHUNKED, b"Content-Length: 5", body=b"5\r\nhello\r\n0\r\n\r\n")),
    "te-gzip-only": (400, _post(b"Transfer-Encoding: gzip", body=b"hello")),
    "te-chunked-not-last": (400, _post(b"Transfer-Encoding: chunked, gzip", body=b"0\r\n\r\n")),
    "te-chunked-twice": (400, _post(b"Transfer-Encoding: chunked, chunked", body=b"0\r\n\r\n")),
    "te-chunked-with-parameter": (400, _post(b"Transfer-Encoding: chunked;q=1", body=b"0\r\n\r\n")),
    "te-empty": (400, _post(b"Transfer-Encoding: ", body=b"0\r\n\r\n")),
    "te-http10": (400, b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    "te-gzip-then-chunked": (501, _post(b"Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n")),
    "te-two-fields": (501, _post(b"Transfer-Encoding: gzip", CHUNKED, body=b"0\r\n\r\n")),
    # chunked bodies
    "chunk-size-word": (400, _post(CHUNKED, body=b"zz\r\nhello\r\n0\r\n\r\n")),
    "chunk-size-negative": (400, _post(CHUNKED, body=b"-5\r\nhello\r\n0\r\n\r\n")),
    "chunk-size-0x": (400, _post(CHUNKED, body=b"0x5\r\nhello\r\n0\r\n\r\n")),
    "chunk-size-plus": (400, _post(CHUNKED, body=b"+5\r\nhello\r\n0\r\n\r\n")),
    "chunk-size-underscore": (400, _post(CHUNKED, body=b"1_0\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n")),
    "chunk-size-17-digits": (400, _post(CHUNKED, body=b"00000000000000005\r\nhello\r\n0\r\n\r\n")),
    "chunk-size-trailing-space": (400, _post(CHUNKED, body=b"5 \r\nhello\r\n0\r\n\r\n")),
    "chunk-size-empty": (400, _post(CHUNKED, body=b"\r\nhello\r\n0\r\n\r\n")),
    "chunk-size-bare-cr": (400, _post(CHUNKED, body=b"5\rX\r\nhello\r\n0\r\n\r\n")),
    "chunk-data-too-long": (400, _post(CHUNKED, body=b"5\r\nhelloXX\r\n0\r\n\r\n")),
    "chunk-data-no-crlf": (400, _post(CHUNKED, body=b"5\r\nhello0\r\n\r\n")),
    "chunk-extension-empty": (400, _post(CHUNKED, body=b"5;\r\nhello\r\n0\r\n\r\n")),
    "chunk-extension-no-name": (400, _post(CHUNKED, body=b"5;=x\r\nhello\r\n0\r\n\r\n")),
    "chunk-extension-open-quote": (400, _post(CHUNKED, body=b'5;a="x\r\nhello\r\n0\r\n\r\n')),
    "chunk-trailer-malformed": (400, _post(CHUNKED, body=b"5\r\nhello\r\n0\r\nnot a field\r\n\r\n")),
    "chunk-trailer-obs-fold": (400, _post(CHUNKED, body=b"5\r\nhello\r\n0\r\nX: a\r\n b\r\n\r\n")),
    # Host: one, required in HTTP/1.1, well-formed
    "host-missing-http11": (400, b"GET /echo HTTP/1.1\r\n\r\n"),
    "host-twice": (400, b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    "host-with-space": (400, b"GET /echo HTTP/1.1\r\nHost: a b\r\n\r\n"),
    "host-with-slash": (400, b"GET /echo HTTP/1.1\r\nHost: a/b\r\n\r\n"),
    # request lines
    "line-http09": (400, b"GET /echo\r\n\r\n"),
    "line-two-spaces": (400, b"GET  /echo HTTP/1.1\r\nHost: test\r\n\r\n"),
    "line-tab": (400, b"GET\t/echo HTTP/1.1\r\nHost: test\r\n\r\n"),
    "line-leading-space": (400, b" GET /echo HTTP/1.1\r\nHost: test\r\n\r\n"),
    "line-four-words": (400, b"GET /echo HTTP/1.1 extra\r\nHost: test\r\n\r\n"),
    "line-junk": (400, b"hello\r\n\r\n"),
    "line-method-not-token": (400, b"G@T /echo HTTP/1.1\r\nHost: test\r\n\r\n"),
    "line-target-not-a-path": (400, b"GET echo HTTP/1.1\r\nHost: test\r\n\r\n"),
    "line-target-control": (400, b"GET /ec\x01ho HTTP/1.1\r\nHost: test\r\n\r\n"),
    "line-target-bad-ipv6": (400, b"GET http://[::1/echo HTTP/1.1\r\nHost: test\r\n\r\n"),
    "line-star-not-options": (400, b"GET * HTTP/1.1\r\nHost: test\r\n\r\n"),
    "version-1.10": (400, b"GET /echo HTTP/1.10\r\nHost: test\r\n\r\n"),
    "version-2.0": (400, b"GET /echo HTTP/2.0\r\nHost: test\r\n\r\n"),
    "version-1.2": (400, b"GET /echo HTTP/1.2\r\nHost: test\r\n\r\n"),
    "version-lower-case": (400, b"GET /echo http/1.1\r\nHost: test\r\n\r\n"),
    "version-missing-minor": (400, b"GET /echo HTTP/1\r\nHost: test\r\n\r\n"),
    # field lines
    "field-obs-fold": (400, b"GET /echo HTTP/1.1\r\nHost: test\r\nX-A: a\r\n b\r\n\r\n"),
    "field-bare-cr": (400, b"GET /echo HTTP/1.1\r\nHost: test\r\nX-A: a\rContent-Length: 5\r\n\r\nhello"),
    "field-nul": (400, b"GET /echo HTTP/1.1\r\nHost: test\r\nX-A: a\x00b\r\n\r\n"),
    "field-del": (400, b"GET /echo HTTP/1.1\r\nHost: test\r\nX-A: a\x7fb\r\n\r\n"),
    "field-name-with-space": (400, b"GET /echo HTTP/1.1\r\nHost: test\r\nX A: b\r\n\r\n"),
    "field-name-empty": (400, b"GET /echo HTTP/1.1\r\nHost: test\r\n: b\r\n\r\n"),
    "field-no-colon": (400, b"GET /echo HTTP/1.1\r\nHost: test\r\nNoColon\r\n\r\n"),
    "field-first-line-folded": (400, b"GET /echo HTTP/1.1\r\n Host: test\r\n\r\n"),
    # limits
    "too-many-fields": (431, b"GET /echo HTTP/1.1\r\nHost: test\r\n" + b"X-A: b\r\n" * 100 + b"\r\n"),
    "head-too-large": (431, b"GET /echo HTTP/1.1\r\nHost: test\r\nX-A: " + b"b" * 70_000 + b"\r\n\r\n"),
    "request-line-too-long": (414, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: test\r\n\r\n"),
}

VALID: dict[str, tuple[bytes, bytes]] = {
    "length-with-ows": (_post(b"Content-Length:   5  ", body=b"hello"), b"hello"),
    "length-leading-zeros": (_post(b"Content-Length: 005", body=b"hello"), b"hello"),
    "te-capitalised": (_post(b"Transfer-Encoding: Chunked", body=b"5\r\nhello\r\n0\r\n\r\n"), b"hello"),
    "chunk-upper-hex": (_post(CHUNKED, body=b"A\r\n0123456789\r\n0\r\n\r\n"), b"0123456789"),
    "chunk-extension": (_post(CHUNKED, body=b"5;name=value\r\nhello\r\n0;last\r\n\r\n"), b"hello"),
    "chunk-extensions-spaced": (_post(CHUNKED, body=b"5 ; a ; b = c\r\nhello\r\n0\r\n\r\n"), b"hello"),
    "chunk-extension-quoted": (_post(CHUNKED, body=b'5;a="q\\"x;y"\r\nhello\r\n0\r\n\r\n'), b"hello"),
    "chunk-trailers": (_post(CHUNKED, body=b"3\r\nhel\r\n2\r\nlo\r\n0\r\nX-T: 1\r\nY-T: two\r\n\r\n"), b"hello"),
    "chunk-bare-lf": (_post(CHUNKED, body=b"5\nhello\n0\n\n"), b"hello"),
    "http10-without-host": (b"POST /echo HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
    "leading-empty-line": (b"\r\n" + _post(b"Content-Length: 5", body=b"hello"), b"hello"),
    "bare-lf-line-ends": (b"POST /echo HTTP/1.1\nHost: test\nContent-Length: 5\n\nhello", b"hello"),
    "absolute-form": (b"POST http://test/echo HTTP/1.1\r\nHost: other\r\nContent-Length: 2\r\n\r\nhi", b"hi"),
    "host-with-port": (b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1:80\r\nContent-Length: 2\r\n\r\nhi", b"hi"),
    "host-ipv6": (b"POST /echo HTTP/1.1\r\nHost: [::1]:80\r\nContent-Length: 2\r\n\r\nhi", b"hi"),
    "host-empty": (b"POST /echo HTTP/1.1\r\nHost:\r\nContent-Length: 2\r\n\r\nhi", b"hi"),
}


@pytest.fixture
def calls() -> list[bytes]:
    """The body of every call of ``/echo``'s backend."""
    return []


@pytest.fixture
def server(make_serve: Callable[..., Serve], calls: list[bytes]) -> Iterator[HTTPServer]:
    """Our server for an instance with ``/echo`` (GET and POST: the body back)."""
    srv = make_serve(executor="thread")

    def echo(request: Any) -> bytes:
        calls.append(bytes(request.get_data()))
        return calls[-1]

    srv.create_endpoint("echo", "/echo", methods=["GET", "POST"])
    srv.create_backend(echo, "echo:v1")
    srv.link("echo", "echo:v1")
    servers = Servers()
    yield servers.start(srv.wsgi_app())
    servers.close()


@pytest.mark.parametrize("status, request_bytes", MALFORMED.values(), ids=list(MALFORMED))
def test_a_malformed_request_is_refused_before_closing(
    server: HTTPServer, calls: list[bytes], caplog: pytest.LogCaptureFixture, status: int, request_bytes: bytes
) -> None:
    caplog.set_level(logging.DEBUG, logger="serve_core")
    wire = Wire(server.address)
    try:
        wire.send(request_bytes + b"GET /echo HTTP/1.1\r\nHost: test\r\n\r\n")  # a request behind it: never served
        reply = wire.response()
        assert (reply.status, reply.headers["connection"]) == (status, "close"), reply.text
        assert b"Traceback" not in reply.body and reply.text.strip()
        assert wire.closed_by_server()
    finally:
        wire.close()
    assert calls == []
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]


@pytest.mark.parametrize("request_bytes, body", VALID.values(), ids=list(VALID))
def test_a_valid_request_is_served_and_the_connection_kept(
    server: HTTPServer, calls: list[bytes], request_bytes: bytes, body: bytes
) -> None:
    wire = Wire(server.address)
    try:
        wire.send(request_bytes)
        reply = wire.response()
        assert (reply.status, reply.body) == (200, body), reply.text
        keeps = not request_bytes.startswith(b"POST /echo HTTP/1.0")
        assert (reply.headers.get("connection") != "close") is keeps
        if keeps:  # the next request on the same connection starts where this one ended
            wire.send(b"GET /echo HTTP/1.1\r\nHost: test\r\n\r\n")
            assert wire.response().status == 200
    finally:
        wire.close()
    assert calls[0] == body


@pytest.mark.parametrize(
    "sent",
    [
        _post(b"Content-Length: 10", body=b"hello"),
        _post(CHUNKED, body=b"5\r\nhello\r\n"),
        _post(CHUNKED, body=b"5\r\nhel"),
        _post(CHUNKED, body=b"5\r\nhello\r\n0\r\nX-T: 1\r\n"),
        b"GET /echo HTTP/1.1\r\nHost: te",
    ],
    ids=["body-short-of-its-length", "no-last-chunk", "inside-a-chunk", "inside-the-trailer", "inside-the-head"],
)
def test_a_request_cut_short_by_the_client_is_400_not_served(
    server: HTTPServer, calls: list[bytes], caplog: pytest.LogCaptureFixture, sent: bytes
) -> None:
    wire = Wire(server.address)
    try:
        wire.send(sent)
        wire.sock.shutdown(socket.SHUT_WR)  # the client is done sending but still reads
        reply = wire.response()
        assert (reply.status, reply.headers["connection"]) == (400, "close"), reply.text
        assert wire.closed_by_server()
    finally:
        wire.close()
    assert calls == []
    assert not [r for r in caplog.records if r.exc_info]


def test_a_smuggled_request_behind_a_bad_length_is_never_served(server: HTTPServer, calls: list[bytes]) -> None:
    smuggled = b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 8\r\n\r\nsmuggled"
    wire = Wire(server.address)
    try:
        wire.send(_post(b"Content-Length : %d" % len(smuggled), body=smuggled))
        assert wire.response().status == 400
        assert wire.closed_by_server()  # the bytes after the head were not read as a request
    finally:
        wire.close()
    assert calls == []


def test_an_app_that_catches_the_body_error_is_overruled(make_serve: Callable[..., Serve]) -> None:
    def swallowing(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        try:
            environ["wsgi.input"].read()
        except Exception:  # noqa: BLE001 - the app under test ignores the failed read
            pass
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    servers = Servers()
    try:
        wire = Wire(servers.start(swallowing).address)
        wire.send(_post(CHUNKED, body=b"zz\r\n"))
        reply = wire.response()
        assert (reply.status, reply.headers["connection"]) == (400, "close")
        assert "chunk size" in reply.text
        wire.close()
    finally:
        servers.close()

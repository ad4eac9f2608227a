"""A fuzzer over raw HTTP requests, on our standalone server and under Granian (Hypothesis, fixed seed).

Each example is sent on a new connection: a request built from parts (methods, targets,
versions, field lines, separators, line ends, bodies framed by a length or chunks, right
or wrong) or plain random bytes. Whatever it is, the first answer (if any, within a short
quiet time) is no 5xx except the backend's own 500 at ``/fail`` and our 501 for a
transfer coding other than chunked; no answer carries a traceback; and the server then
answers a normal request on a new connection.

Bounded: ``MAX_EXAMPLES`` per server, ``derandomize=True`` (the same examples every run),
no example database, every read under a timeout; 127.0.0.1 only.
"""

from __future__ import annotations

import importlib.util
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_core import Serve

from ..conftest import WAIT, require
from .helpers import Servers, granian_app, timed_get

MAX_EXAMPLES = 100
QUIET_S = 0.3  # an answer not started within this is no answer (the request may be incomplete)
REPO = Path(__file__).resolve().parents[2]
APP = """
import serve_core as serve

def echo(request):
    return bytes(request.get_data())

def fail(request):
    raise RuntimeError("the backend failed on purpose")

for backend in (echo, fail):
    serve.create_endpoint(backend.__name__, "/" + backend.__name__, methods=["GET", "POST", "PUT"])
    serve.create_backend(backend, backend.__name__ + ":v1")
    serve.link(backend.__name__, backend.__name__ + ":v1")
"""

# ---------------------------------------------------------------- requests
# Each part of a request has valid values and others; a request breaks at most two parts.
TCHAR = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$%&'*+.^_`|~"
TOKEN = st.text(TCHAR, min_size=1, max_size=12)
TEXT = st.binary(max_size=12).map(lambda raw: raw.decode("latin-1"))
PARTS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "method": (
        st.sampled_from(["GET", "POST", "PUT", "HEAD", "OPTIONS", "DELETE"]),
        st.sampled_from(["CONNECT", "PRI", "G@T", "get", ""]) | TOKEN | TEXT,
    ),
    "target": (
        st.sampled_from(
            ["/echo", "/fail", "/-/healthz", "/-/routes", "/-/stat", "/nowhere", "//echo", "/echo?a=1&b",
             "http://test/echo", "/echo?relative_slo_ms=-5", "/echo?relative_slo_ms=1e9", "/%00", "/%zz", "/-/"]
        ),  # fmt: skip
        st.sampled_from(["*", "http://[::1/echo", "host:443", "echo", "", "/a b"]) | TEXT.map(lambda t: "/" + t),
    ),
    "version": (
        st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"]),
        st.sampled_from(["HTTP/1.10", "HTTP/2.0", "HTTP/1.2", "HTTP/0.9", "http/1.1", "HTTP/1", "", "HTTP/1.1 x"]),
    ),
    "eol": (st.just("\r\n"), st.sampled_from(["\n", "\r", "\r\r\n"])),
    "separator": (st.sampled_from([": ", ":", ":\t", ":  "]), st.sampled_from([" : ", " :", ": \r\n ", "="])),
    "fields": (
        st.lists(
            st.tuples(st.sampled_from(["Accept", "X-Serve-Shard-Key", "Connection", "User-Agent"]), TOKEN)
            | st.tuples(st.just("Expect"), st.just("100-continue"))
            | st.tuples(st.just("Connection"), st.sampled_from(["close", "keep-alive"]))
            | st.tuples(st.just("X-Serve-Call-Method"), st.sampled_from(["__call__", "_private", "missing"])),
            max_size=4,
        ),
        st.lists(
            st.tuples(TOKEN, TEXT)
            | st.tuples(st.sampled_from(["Content-Length ", " Folded", "X Y", "", "X\x00", "Host"]), TOKEN),
            min_size=1, max_size=4,
        ),  # fmt: skip
    ),
    "host": (st.sampled_from(["test", "127.0.0.1:8000", "[::1]"]), st.sampled_from([None, "a b", "a/b"]) | TEXT),
    "framing": (
        st.sampled_from(["length", "chunked"]),
        st.sampled_from(["none", "short", "long", "both", "twice"])
        | st.tuples(st.just("Content-Length"), st.sampled_from(["-1", "abc", "1e3", "5, 5", "+5", "0x5", "", "9" * 20]))
        | st.tuples(st.just("Transfer-Encoding"), st.sampled_from(["gzip", "gzip, chunked", "chunked, chunked", "x"])),
    ),
    "chunks": (
        st.lists(st.binary(min_size=1, max_size=8), max_size=3).map(lambda chunks: (chunks, b"0\r\n\r\n")),
        st.tuples(
            st.lists(st.binary(min_size=1, max_size=8), max_size=3),
            st.sampled_from([b"zz\r\n", b"-1\r\n", b"5\r\nabc\r\n", b"5;\r\n", b"\r\n", b"0\r\nbad\r\n\r\n"])
            | st.binary(max_size=12),
        ),
    ),
}
VALID_END = st.sampled_from([b"0\r\n\r\n", b"0\r\nX-T: 1\r\n\r\n", b"0;ext=1\r\n\r\n"])


@st.composite
def structured(draw: st.DrawFn) -> tuple[bytes, str, str]:
    """A request from parts, at most two of them broken: its bytes, its method and its target."""
    broken = draw(st.sets(st.sampled_from(sorted(PARTS)), max_size=2))
    part = {name: draw(PARTS[name][name in broken]) for name in PARTS}
    fields = ([("Host", part["host"])] if part["host"] is not None else []) + list(part["fields"])
    chunks, end = part["chunks"]
    if end == b"0\r\n\r\n":
        end = draw(VALID_END)
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + end
    body = draw(st.binary(max_size=24))
    framing = part["framing"]
    if framing == "chunked" or (isinstance(framing, tuple) and framing[0] == "Transfer-Encoding"):
        fields.append(("Transfer-Encoding", "chunked" if framing == "chunked" else framing[1]))
        body = chunked
    elif isinstance(framing, tuple):
        fields.append(framing)
    elif framing != "none":
        length = {"short": len(body) + 3, "long": max(0, len(body) - 3)}.get(framing, len(body))
        fields += [("Content-Length", str(length))] * (2 if framing == "twice" else 1)
        if framing == "both":
            fields.append(("Transfer-Encoding", "chunked"))
    eol, separator = part["eol"], part["separator"]
    line = " ".join(piece for piece in (part["method"], part["target"], part["version"]) if piece)
    head = line + eol + "".join(f"{name}{separator}{value}{eol}" for name, value in fields) + eol
    return head.encode("latin-1") + body, part["method"], part["target"]


REQUESTS = structured() | st.binary(max_size=120).map(lambda raw: (raw, "", ""))


# ------------------------------------------------------------------ answers
def first_answer(sock: socket.socket, head_only: bool) -> tuple[bytes, bytes] | None:
    """The first response (head, body) as framed, or ``None`` if none starts within ``QUIET_S``."""
    data = b""
    sock.settimeout(QUIET_S)
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return (data, b"") if data else None
            data += chunk
            sock.settimeout(WAIT)  # it started: the rest follows
        head, _, rest = data.partition(b"\r\n\r\n")
        match = re.search(rb"(?im)^content-length: *(\d+)", head)
        if head_only or head.split(b" ", 2)[1:2] in ([b"204"], [b"304"]):
            return head, b""
        if match:
            while len(rest) < int(match[1]) and (chunk := sock.recv(65536)):
                rest += chunk
            return head, rest[: int(match[1])]
        while chunk := sock.recv(65536):  # chunked or to the end: read what comes (bounded by the timeout)
            rest += chunk
            if rest.endswith(b"0\r\n\r\n"):
                break
        return head, rest
    except TimeoutError:
        return (data, b"") if data else None
    except ConnectionError:
        return None


def check(address: tuple[str, int], request: tuple[bytes, str, str]) -> None:
    raw, method, target = request
    with socket.create_connection(address, timeout=WAIT) as sock:
        try:
            sock.sendall(raw)
        except ConnectionError:
            pass  # the server refused and closed early: what it sent is checked below
        answer = first_answer(sock, head_only=method == "HEAD")
    if answer is not None:
        head, body = answer
        assert b"Traceback" not in head + body, (raw, head + body)
        status = int(head.split(b" ", 2)[1]) if re.match(rb"HTTP/1\.[01] \d{3} ", head) else 0
        assert status, ("not an HTTP response", raw, head)
        backends_own = status == 500 and target.startswith("/fail") and b"error id" in body
        not_implemented = status == 501 and b"transfer coding" in raw.lower()
        assert status < 500 or backends_own or not_implemented, (raw, head + body)
    status, took = timed_get(address)
    assert status == 200, (raw, status)


# ----------------------------------------------------------------- servers
@pytest.fixture
def standalone(make_serve: Callable[..., Serve]) -> Iterator[tuple[str, int]]:
    """Our server for the fuzzer's app, with short deadlines (incomplete requests end fast)."""
    srv = make_serve(executor="thread")
    namespace: dict[str, Any] = {}
    exec(compile(APP.replace("import serve_core as serve", ""), "<fuzz app>", "exec"), {"serve": srv}, namespace)
    servers = Servers()
    yield servers.start(srv.wsgi_app(), head_timeout_s=0.3, body_timeout_s=0.3).address
    servers.close()


@pytest.fixture(scope="module")
def granian(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """The fuzzer's app under Granian (``serve-core run --server granian``), for the whole module."""
    require(importlib.util.find_spec("granian") is not None, "granian is not installed")
    ready = lambda address: timed_get(address)[0] == 200  # noqa: E731
    with granian_app(tmp_path_factory.mktemp("granian-fuzz"), APP, ready) as address:
        yield address


FUZZ = settings(
    derandomize=True,
    database=None,
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(request=REQUESTS)
def test_fuzz_the_standalone_server(standalone: tuple[str, int], request: tuple[bytes, str, str]) -> None:
    check(standalone, request)


@FUZZ
@given(request=REQUESTS)
def test_fuzz_granian(granian: tuple[str, int], request: tuple[bytes, str, str]) -> None:
    check(granian, request)

"""The standalone server: binding, readiness, shutdown, concurrency, the module API."""

from __future__ import annotations

import logging
import os
import pickle
import socket
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

import serve_core as serve
from serve_core import Serve, ServeStateError
from serve_core.http.request import ServeRequest
from serve_core.http.server import HTTPServer

from ..conftest import WAIT
from ..net import port_is_free
from .helpers import base_url


def test_port_zero_reports_bound_address_and_shutdown_frees_it(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(start_server=True, http_port=0, blocking=True)
    host, port = srv.http_address() or ("", 0)
    assert host == "127.0.0.1" and port > 0
    assert requests.get(f"http://{host}:{port}/-/healthz", timeout=WAIT).text == "ok\n"
    srv.shutdown()
    assert srv.http_address() is None
    assert port_is_free(port)


def test_taken_port_is_a_clear_error(make_serve: Callable[..., Serve]) -> None:
    first = make_serve(start_server=True, http_port=0)
    _, port = first.http_address() or ("", 0)
    with pytest.raises(ServeStateError, match=f"cannot serve HTTP on 127.0.0.1:{port}"):
        make_serve(start_server=True, http_port=port)


def test_non_loopback_bind_warns(make_serve: Callable[..., Serve], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="serve_core.http"):
        make_serve(start_server=True, http_host="0.0.0.0", http_port=0, blocking=True)
    assert any("non-loopback" in r.getMessage() for r in caplog.records)


def test_shutdown_ends_keep_alive_connections(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(start_server=True, http_port=0)
    srv.create_endpoint("f", "/f")
    srv.create_backend(lambda request: "x", "f:v1")
    srv.link("f", "f:v1")
    session = requests.Session()  # keeps its connection (and a server thread) open
    url = base_url(srv) + "/f"
    assert session.get(url, timeout=WAIT).text == "x"
    srv.shutdown()  # the autouse leak check fails if the connection's thread survives
    session.close()


def test_hundred_concurrent_requests_none_lost(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(start_server=True, http_port=0, blocking=True)
    srv.create_endpoint("echo", "/echo")
    srv.create_backend(lambda request: request.args["i"], "echo:v1")
    srv.link("echo", "echo:v1")
    config = srv.get_backend_config("echo:v1")
    config.num_replicas = 4
    srv.set_backend_config("echo:v1", config)
    url = base_url(srv) + "/echo"

    def call(i: int) -> tuple[int, str]:
        reply = requests.get(url, params={"i": i}, timeout=WAIT)
        return reply.status_code, reply.text

    with ThreadPoolExecutor(max_workers=100) as pool:
        replies = list(pool.map(call, range(100)))
    assert replies == [(200, str(i)) for i in range(100)]


def test_chunked_body_past_limit_is_413(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(start_server=True, http_port=0, max_body_bytes=100)
    srv.create_endpoint("f", "/f", methods=["POST"])
    srv.create_backend(lambda request: len(request.get_data()), "f:v1")
    srv.link("f", "f:v1")
    url = base_url(srv) + "/f"
    assert requests.post(url, data=iter([b"x" * 50, b"y" * 50]), timeout=WAIT).text == "100"
    assert requests.post(url, data=iter([b"x" * 80, b"y" * 80]), timeout=WAIT).status_code == 413


def test_module_api() -> None:
    serve.init(http_port=0, blocking=True, executor="thread")
    serve.create_endpoint("f", "/f")
    serve.create_backend(lambda request: "module", "f:v1")
    serve.link("f", "f:v1")
    host, port = serve.http_address() or ("", 0)
    assert requests.get(f"http://{host}:{port}/f", timeout=WAIT).text == "module"
    assert serve.wsgi_app() is serve.wsgi_app()
    serve.shutdown()
    assert port_is_free(port)


def test_request_pickles_with_its_body() -> None:
    environ = EnvironBuilder(
        path="/f", query_string="a=1", method="POST", json={"k": 1}, headers=[("X-H", "v")]
    ).get_environ()
    request = ServeRequest(environ)
    request.get_data()
    copy = pickle.loads(pickle.dumps(request))
    assert isinstance(copy, Request)
    assert (copy.args["a"], copy.get_json(), copy.headers["X-H"], copy.method) == ("1", {"k": 1}, "v", "POST")


def test_core_does_not_import_werkzeug() -> None:
    code = (
        "import sys, serve_core as serve\n"
        "s = serve.Serve(start_server=False)\n"
        "assert 'werkzeug' not in sys.modules, 'importing the core pulled in werkzeug'\n"
        "s.wsgi_app()\n"
        "assert 'werkzeug' in sys.modules\n"
        "s.shutdown()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=WAIT)


def test_connections_past_the_cap_get_503(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve()
    server = HTTPServer(srv.wsgi_app(), "127.0.0.1", 0, max_connections=2)
    idle = [socket.create_connection(server.address, timeout=WAIT) for _ in range(2)]
    try:
        for sock in idle:  # answered, then busy reading a body that never comes (idle ones would be evicted)
            sock.sendall(b"GET /-/healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        assert server.open_connections == 2
        response = requests.get(f"{server.url}/-/healthz", timeout=WAIT)
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    finally:
        for sock in idle:
            sock.close()
        server.close()

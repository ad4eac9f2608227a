"""Mounting the app under a prefix of another WSGI app (plain Werkzeug, and Flask)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import Client
from werkzeug.wrappers import Request, Response

from serve_core import Serve


def _deployed(make_serve: Callable[..., Serve]) -> Serve:
    srv = make_serve()
    srv.create_endpoint("echo", "/echo", methods=["GET", "POST"])
    srv.create_backend(lambda request: {"path": request.path, "root": request.root_path}, "echo:v1")
    srv.link("echo", "echo:v1")
    return srv


def _host_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    return Response("host app")(environ, start_response)


def test_mounted_under_prefix_in_plain_wsgi(make_serve: Callable[..., Serve]) -> None:
    srv = _deployed(make_serve)
    client = Client(DispatcherMiddleware(_host_app, {"/models": srv.wsgi_app()}))
    assert client.get("/models/echo").get_json() == {"path": "/echo", "root": "/models"}
    assert client.get("/models/-/routes").get_json() == {"/echo": ["echo", ["GET", "POST"]]}
    assert client.get("/other").get_data() == b"host app"
    assert client.get("/echo").get_data() == b"host app"
    missing = client.get("/models/nope")
    assert missing.status_code == 404 and "GET /models/-/routes" in missing.get_data(as_text=True)


def test_mounted_inside_flask(make_serve: Callable[..., Serve]) -> None:
    flask = pytest.importorskip("flask")
    srv = _deployed(make_serve)
    app = flask.Flask("host")

    @app.route("/")
    def index() -> str:
        return "flask index"

    app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/serve": srv.wsgi_app()})
    client = app.test_client()
    assert client.get("/").get_data() == b"flask index"
    assert client.post("/serve/echo").get_json() == {"path": "/echo", "root": "/serve"}
    assert isinstance(Request, type)

"""The module-level API and the exported names."""

from __future__ import annotations

import subprocess
import sys

import pytest

import serve_core as serve
from serve_core.errors import ServeStateError

from .conftest import WAIT

EXPORTED = {
    "AutoscalingConfig", "BackPressureError", "BackendConfig", "BatchAnnotationError", "BatchResultError",
    "ConflictError", "DeadlineExceededError", "LoopBackError", "MethodNotFoundError", "NotFoundError", "Policy",
    "RayServeException",
    "ReplicaDiedError", "RoutePolicy", "Serve", "ServeError", "ServeHandle", "ServeStateError",
    "ServeTypeError", "ShuttingDownError", "StoreError", "ValidationError", "WebOnlyAccessError", "__version__",
    "accept_batch", "context", "create_backend", "create_endpoint", "get_backend_config", "get_handle",
    "get_traffic_policy", "http_address", "init", "link", "route", "set_backend_config", "shutdown", "split",
    "stat", "wsgi_app",
}


def test_exported_names_are_pinned() -> None:
    assert set(serve.__all__) == EXPORTED
    for name in serve.__all__:
        assert hasattr(serve, name), name


def test_error_aliases() -> None:
    assert serve.RayServeException is serve.ServeError
    assert issubclass(serve.ValidationError, ValueError)
    assert issubclass(serve.NotFoundError, KeyError)
    assert issubclass(serve.ServeTypeError, TypeError)
    assert serve.BackPressureError("x").status_code == 503


def test_calls_before_init_raise() -> None:
    with pytest.raises(ServeStateError, match=r"init\(\)"):
        serve.create_endpoint("x")


def test_seed_flow_through_the_module_api() -> None:
    instance = serve.init(start_server=False, executor="thread")
    assert serve.init(start_server=False, executor="thread") is instance
    with pytest.warns(UserWarning, match="executor"):
        assert serve.init(start_server=False, executor="inline") is instance

    serve.create_endpoint("my_endpoint", "/echo")

    def echo_v1(flask_request, response="hello from python!"):
        if serve.context.web:
            response = flask_request.url
        return response

    serve.create_backend(echo_v1, "echo:v1")
    config = serve.get_backend_config("echo:v1")
    serve.link("my_endpoint", "echo:v1")
    handle = serve.get_handle("my_endpoint")
    assert handle.remote(response="hi").result(WAIT) == "hi"
    serve.create_backend(lambda flask_request: "something new", "echo:v2")
    serve.split("my_endpoint", {"echo:v1": 0.5, "echo:v2": 0.5})
    assert serve.get_traffic_policy("my_endpoint") == {"echo:v1": 0.5, "echo:v2": 0.5}
    config.num_replicas = 2
    serve.set_backend_config("echo:v1", config)
    assert serve.stat()["backend_echo:v1_num_replicas"] == 2

    @serve.route("/hello")
    def hello():
        return "hello"

    assert hello.remote().result(WAIT) == "hello"
    serve.shutdown()
    serve.shutdown()
    assert not instance.running
    with pytest.raises(ServeStateError):
        serve.stat()


def test_import_does_not_import_optional_components() -> None:
    """Nor numpy (used by stat() on first call) nor prometheus_client: `import serve_core` stays fast."""
    heavy = ("ray", "sqlalchemy", "werkzeug", "numpy", "prometheus_client")
    code = f"import sys, serve_core; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"

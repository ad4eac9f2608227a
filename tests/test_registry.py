"""Validation of endpoints, backends, configs and traffic through the Serve API."""

from __future__ import annotations

import pytest

import serve_core as serve
from serve_core import BackendConfig, Serve
from serve_core.errors import (
    BatchAnnotationError,
    ConflictError,
    NotFoundError,
    ServeTypeError,
    ValidationError,
)

from .conftest import WAIT


def echo(request=None):
    return "echo"


def other(request=None):
    return "other"


@pytest.fixture
def inline(make_serve) -> Serve:
    return make_serve(executor="inline")


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("e", "no-slash"), ValidationError),
        (("e", "/-/routes"), ValidationError),
        (("e", "/with space"), ValidationError),
        (("e", 5), ServeTypeError),
        (("", "/x"), ValidationError),
        ((None, "/x"), ServeTypeError),
        (("e", "/x", ["FETCH"]), ValidationError),
        (("e", "/x", []), ValidationError),
    ],
)
def test_create_endpoint_rejects(inline: Serve, args: tuple, error: type[Exception]) -> None:
    with pytest.raises(error):
        inline.create_endpoint(*args)
    assert inline.list_endpoints() == {}


def test_endpoint_redefinition(inline: Serve) -> None:
    inline.create_endpoint("e", "/x", ["get", "POST", "get"])
    inline.create_endpoint("e", "/x", ["GET", "POST"])  # identical after normalising: no-op
    assert inline.route_table() == {"/x": ["e", ["GET", "POST"]]}
    with pytest.raises(ConflictError, match="already exists"):
        inline.create_endpoint("e", "/y")
    with pytest.raises(ConflictError, match="already serves"):
        inline.create_endpoint("f", "/x")


def test_create_backend_rejects(inline: Serve) -> None:
    with pytest.raises(ServeTypeError, match="function or a class"):
        inline.create_backend(len, "builtin")
    with pytest.raises(ServeTypeError, match="function or a class"):
        inline.create_backend(echo.__call__, "bound")  # type: ignore[operator]
    with pytest.raises(ServeTypeError, match="init arguments"):
        inline.create_backend(echo, "args", 1)
    with pytest.raises(ServeTypeError, match="BackendConfig"):
        inline.create_backend(echo, "cfg", backend_config={"num_replicas": 2})  # type: ignore[arg-type]
    with pytest.raises(BatchAnnotationError, match="accept_batch"):
        inline.create_backend(echo, "batch", backend_config=BackendConfig(max_batch_size=2))

    class NoCall:
        pass

    with pytest.raises(ServeTypeError, match="neither __call__ nor a public method"):
        inline.create_backend(NoCall, "nocall")
    assert inline.list_backends() == {}


def test_class_batch_mark_is_read_from_call(inline: Serve) -> None:
    class Batched:
        @serve.accept_batch
        def __call__(self, *, x):
            return x

    inline.create_backend(Batched, "ok", backend_config=BackendConfig(max_batch_size=4))
    assert inline.get_backend_config("ok").max_batch_size == 4


def test_backend_redefinition(inline: Serve) -> None:
    inline.create_backend(echo, "b")
    inline.create_backend(echo, "b")  # identical: no-op
    with pytest.raises(ConflictError, match="different code.*'b:v2'"):
        inline.create_backend(other, "b")
    inline.create_backend(echo, "b:v2")
    with pytest.raises(ConflictError, match="'b:v3'"):  # not 'b:v2:v2'
        inline.create_backend(other, "b:v2")
    # Same code, another config: a no-op that keeps the live config (re-running a deploy script).
    inline.create_backend(echo, "b", backend_config=BackendConfig(num_replicas=2))
    assert inline.get_backend_config("b").num_replicas == 1


def test_set_backend_config_validation(inline: Serve) -> None:
    inline.create_backend(echo, "b")
    with pytest.raises(BatchAnnotationError):
        inline.set_backend_config("b", BackendConfig(max_batch_size=2))
    with pytest.raises(ServeTypeError):
        inline.set_backend_config("b", {"num_replicas": 2})  # type: ignore[arg-type]
    with pytest.raises(NotFoundError):
        inline.set_backend_config("missing", BackendConfig())
    with pytest.raises(KeyError):
        inline.get_backend_config("missing")
    assert inline.get_backend_config("b") == BackendConfig()


def test_get_backend_config_is_detached(inline: Serve) -> None:
    inline.create_backend(echo, "b")
    config = inline.get_backend_config("b")
    config.num_replicas = 5
    assert inline.get_backend_config("b").num_replicas == 1


def test_invalid_split_changes_nothing(inline: Serve) -> None:
    inline.create_endpoint("e")
    inline.create_backend(echo, "a")
    inline.create_backend(other, "b")
    inline.split("e", {"a": 0.3, "b": 0.7})
    for bad in ({"a": 0.5, "b": 0.3}, {"a": 1.0, "zzz": 0.0}, {"a": -1.0, "b": 2.0}, {}):
        with pytest.raises((ValueError, KeyError)):
            inline.split("e", bad)
    assert inline.get_traffic_policy("e") == pytest.approx({"a": 0.3, "b": 0.7})
    with pytest.raises(NotFoundError):
        inline.split("nope", {"a": 1.0})


def test_split_normalises(inline: Serve) -> None:
    inline.create_endpoint("e")
    inline.create_backend(echo, "a")
    inline.create_backend(other, "b")
    inline.split("e", {"a": 0.5, "b": 0.4995})
    weights = inline.get_handle("e").get_traffic_policy()
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-12)


def test_handles(inline: Serve) -> None:
    with pytest.raises(NotFoundError, match="not registered"):
        inline.get_handle("nope")
    inline.create_endpoint("e")
    with pytest.raises(NotFoundError, match="no traffic"):
        inline.get_traffic_policy("e")
    with pytest.raises(ValidationError, match="not both"):
        inline.get_handle("e", relative_slo_ms=1, absolute_slo_ms=1)
    with pytest.raises(ValidationError):
        inline.get_handle("e", relative_slo_ms=-5)
    handle = inline.get_handle("e", relative_slo_ms=50)
    child = handle.options(method_name="m", shard_key="k")
    grandchild = child.options(absolute_slo_ms=10**13)
    assert (child.method_name, child.slo.relative_ms, child.shard_key) == ("m", 50, "k")
    assert (grandchild.method_name, grandchild.shard_key) == ("m", "k")
    assert (grandchild.slo.relative_ms, grandchild.slo.absolute_ms) == (None, 10**13)
    assert child.options(shard_key=None).shard_key is None
    with pytest.raises(ValidationError):
        handle.options(method_name="")


def test_route_decorator(inline: Serve) -> None:
    @inline.route("/hello")
    def hello(request=None, *, name="world"):
        return f"hello {name}"

    assert isinstance(hello, serve.ServeHandle)
    assert hello.remote(name="x").result(WAIT) == "hello x"
    assert hello.get_traffic_policy() == {"hello:v0": 1.0}
    assert inline.route_table() == {"/hello": ["hello", ["GET"]]}


def test_handle_scale_and_batch_size(inline: Serve) -> None:
    @inline.route("/counter")
    def counter(request=None):
        return 1

    counter.scale(2)
    assert inline.get_backend_config("counter:v0").num_replicas == 2
    with pytest.raises(BatchAnnotationError, match="accept_batch"):
        counter.set_max_batch_size(2)


def test_stat_validation(inline: Serve) -> None:
    with pytest.raises(ValueError, match="gc_window_seconds"):
        inline.stat(agg_windows_seconds=[7200])
    assert inline.stat() == {}


def test_instances_are_independent(make_serve) -> None:
    first, second = make_serve(executor="inline"), make_serve(executor="thread")
    for srv, answer in ((first, "one"), (second, "two")):
        srv.create_endpoint("e")
        srv.create_backend(lambda answer=answer: answer, "b")
        srv.link("e", "b")
    assert first.get_handle("e").remote().result(WAIT) == "one"
    assert second.get_handle("e").remote().result(WAIT) == "two"


def test_context_manager() -> None:
    with Serve(start_server=False) as srv:
        srv.create_endpoint("e")
        assert srv.running
    assert not srv.running


def test_route_decorator_on_a_taken_route_leaves_nothing(inline: Serve) -> None:
    inline.create_endpoint("first", "/taken")

    def second(request=None):
        return 2

    with pytest.raises(ConflictError):
        inline.route("/taken")(second)
    assert "second:v0" not in inline.list_backends()


def test_endpoints_and_backends_are_listed(inline: Serve) -> None:
    inline.create_endpoint("api", "/api", methods=["GET", "POST"])
    inline.create_endpoint("py")
    inline.create_backend(lambda: "x", "b:v1", backend_config=BackendConfig(num_replicas=2))
    inline.link("api", "b:v1")
    assert inline.list_endpoints() == {
        "api": {"route": "/api", "methods": ["GET", "POST"], "traffic": {"b:v1": 1.0}},
        "py": {"route": None, "methods": ["GET"], "traffic": None},
    }
    backends = inline.list_backends()
    assert list(backends) == ["b:v1"] and backends["b:v1"].num_replicas == 2
    backends["b:v1"].num_replicas = 5  # a detached copy
    assert inline.get_backend_config("b:v1").num_replicas == 2

"""Calling conventions, on every executor: arguments, placeholder, methods, errors."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import serve_core as serve
from serve_core import Serve
from serve_core.errors import MethodNotFoundError, ServeError, ServeTypeError, WebOnlyAccessError

from .conftest import WAIT


def deploy(srv: Serve, target: object, *init_args: object, **config: Any) -> serve.ServeHandle:
    srv.create_endpoint("ep")
    srv.create_backend(target, "b", *init_args, backend_config=serve.BackendConfig(**config))
    srv.link("ep", "b")
    return srv.get_handle("ep")


def test_python_call_gets_kwargs_and_a_placeholder(srv: Serve) -> None:
    def backend(request, *, x=0, y=0):
        assert not serve.context.web and serve.context.batch_size is None
        try:
            _ = request.args
        except WebOnlyAccessError as exc:
            return (x + y, str(exc))
        return None

    total, message = deploy(srv, backend).remote(x=1, y=2).result(WAIT)
    assert total == 3
    assert "serve.context.web" in message


def test_placeholder_errors_are_serve_and_attribute_errors(srv: Serve) -> None:
    def backend(request):
        return request.url

    with pytest.raises(WebOnlyAccessError) as info:
        deploy(srv, backend).remote().result(WAIT)
    assert isinstance(info.value, ServeError) and isinstance(info.value, AttributeError)


@pytest.mark.parametrize(
    "target",
    [
        lambda: "none",
        lambda *, x=None: "kwonly",
        lambda request=None: "optional",
        lambda **kw: "varkw",
    ],
    ids=["no-params", "kwonly", "optional", "varkw"],
)
def test_positional_dropped_without_required_parameter(srv: Serve, target: object) -> None:
    assert deploy(srv, target).remote().result(WAIT) in {"none", "kwonly", "optional", "varkw"}


def test_class_backend_with_init_args_and_methods(srv: Serve) -> None:
    class Model:
        def __init__(self, prefix: str) -> None:
            self.prefix = prefix

        def __call__(self, request, *, name="x"):
            return f"{self.prefix}:{name}"

        def shout(self, *, name="x"):
            return f"{self.prefix}:{name.upper()}"

        def _secret(self):
            return "leaked"

        @property
        def side_effect(self):
            raise AssertionError("a property must not run when looked up as a method")

    handle = deploy(srv, Model, "hello")
    assert handle.remote(name="a").result(WAIT) == "hello:a"
    assert handle.options(method_name="shout").remote(name="a").result(WAIT) == "hello:A"
    for method in ("_secret", "__init__", "missing", "prefix", "side_effect"):
        with pytest.raises(MethodNotFoundError):
            handle.options(method_name=method).remote().result(WAIT)
    assert handle.remote(name="still-works").result(WAIT) == "hello:still-works"


def test_function_backend_only_has_call(srv: Serve) -> None:
    handle = deploy(srv, lambda: 1)
    with pytest.raises(MethodNotFoundError):
        handle.options(method_name="other").remote().result(WAIT)
    assert handle.remote().result(WAIT) == 1


def test_user_exception_keeps_its_type_and_the_replica_survives(srv: Serve) -> None:
    class Oops(Exception):
        pass

    def backend(*, fail=False):
        if fail:
            raise Oops("bad input")
        return "ok"

    handle = deploy(srv, backend)
    for _ in range(3):
        with pytest.raises(Oops, match="bad input"):
            handle.remote(fail=True).result(WAIT)
    assert handle.remote().result(WAIT) == "ok"
    assert srv.stat()["b_error_counter"] == 3
    assert srv.stat()["backend_b_num_replicas"] == 1


def test_wrong_call_signature_is_a_user_error(srv: Serve) -> None:
    handle = deploy(srv, lambda request, other: 1)
    with pytest.raises(TypeError):
        handle.remote().result(WAIT)
    with pytest.raises(TypeError):
        handle.remote(unexpected=1).result(WAIT)


def test_async_backend(srv: Serve) -> None:
    async def backend(*, x):
        await asyncio.sleep(0)
        return x * 2

    assert deploy(srv, backend).remote(x=21).result(WAIT) == 42


def test_positional_arguments_to_remote_raise(srv: Serve) -> None:
    handle = deploy(srv, lambda: 1)
    with pytest.raises(ServeTypeError, match="keyword"):
        handle.remote(1)


def test_future_is_awaitable(srv: Serve) -> None:
    handle = deploy(srv, lambda *, x: x + 1)

    async def main() -> int:
        return await handle.remote(x=1)

    assert asyncio.run(main()) == 2


def test_constructor_error_fails_create_backend(srv: Serve) -> None:
    class Broken:
        def __init__(self) -> None:
            raise RuntimeError("cannot load model")

        def __call__(self):
            return 1

    with pytest.raises(RuntimeError, match="cannot load model"):
        srv.create_backend(Broken, "broken")
    srv.create_backend(lambda: "fine", "broken")
    srv.create_endpoint("e")
    srv.link("e", "broken")
    assert srv.get_handle("e").remote().result(WAIT) == "fine"


@pytest.mark.parametrize("error", [asyncio.CancelledError, SystemExit, KeyboardInterrupt])
def test_base_exceptions_from_user_code_are_answers(srv: Serve, error: type[BaseException]) -> None:
    def backend(*, fail=False):
        if fail:
            raise error("from the backend")
        return "alive"

    handle = deploy(srv, backend)
    with pytest.raises(error):
        handle.remote(fail=True).result(WAIT)
    assert handle.remote().result(WAIT) == "alive"

"""How a replica calls the user's backend: the calling conventions of the original.

This runs *inside* a replica, whatever executor hosts it (a thread, a worker process,
a Ray actor). :class:`Invoker` builds the backend once and runs :class:`Call` objects:

* a web call passes one positional argument, the request; a Python call passes a
  placeholder that raises on use, plus the handle's keyword arguments;
* the positional argument is dropped when the target has no required positional
  parameter;
* in batch mode the positional argument is a list and every keyword becomes a list;
  the backend must return a list of the same length;
* only ``__call__`` and public methods can be called; a class without ``__call__`` is served
  by its methods' names only (as in the original).

Every failure, before or inside the user code, becomes an :class:`Outcome`; nothing
escapes, so a replica is never lost to a bad call.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

from .context import call_context
from .errors import BatchResultError, MethodNotFoundError, ServeTypeError, WebOnlyAccessError
from .executors.base import Call, Outcome


class PythonCallRequest:
    """The positional argument of a Python (handle) call: any use raises."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        raise WebOnlyAccessError(
            f"request.{name} was used in a call made from Python, which has no HTTP request; "
            "check serve.context.web before using the request"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        self.__getattr__(name)

    def __repr__(self) -> str:
        return "<PythonCallRequest: not a web request>"


_PLACEHOLDER = PythonCallRequest()

REQUEST_ID_KEY = "serve_core.request_id"
"""The environ key of a web request's id (``serve.context.request_id``), set by the HTTP front."""

WARMUP_METHOD = "warmup"
"""A class backend's optional hook, run once after its constructor, before the replica takes calls."""

_PLAIN = frozenset({type(None), bool, int, float, str, bytes, list, tuple, dict})
"""Result types that are never awaitable: skips ``inspect.isawaitable`` on the common answers."""


def is_public_method(name: str) -> bool:
    """Methods reachable by callers: ``__call__`` and names without a leading underscore."""
    return name == "__call__" or (bool(name) and not name.startswith("_"))


def accepts_batch(target: Any) -> bool:
    """Whether a function, or a class's ``__call__``, is marked with ``@accept_batch``."""
    func = target.__call__ if inspect.isclass(target) else target
    return bool(getattr(func, "_serve_accept_batch", False))


def wants_positional(func: Callable[..., Any]) -> bool:
    """True when ``func`` has a required positional parameter (the request)."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        for p in params
    )


class Invoker:
    """Holds one replica's backend object and runs calls on it."""

    def __init__(self, target: Any, init_args: tuple[Any, ...] = ()) -> None:
        self._methods: dict[str, tuple[Callable[..., Any], bool]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        if inspect.isclass(target):
            self._obj: Any = target(*init_args)
            self._is_class = True
            warmup = getattr(self._obj, WARMUP_METHOD, None)
            if callable(warmup):  # before the replica is ready, so it gets no call until it returned
                self._await(warmup())
        else:
            self._obj = target
            self._is_class = False

    def run(self, call: Call) -> list[Outcome]:
        """Run a call; one outcome per query, never raises."""
        try:
            func, positional = self._resolve(call.method)
            if call.batched:
                return self._run_batch(call, func, positional)
            return [self._run_single(call, func, positional)]
        except BaseException as exc:  # noqa: BLE001 - every failure becomes an answer, even
            # SystemExit or asyncio.CancelledError raised by user code: the replica must survive.
            return [Outcome(False, exc)] * len(call)

    def close(self) -> None:
        """Release the event loop used for async backends."""
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def _resolve(self, method: str) -> tuple[Callable[..., Any], bool]:
        cached = self._methods.get(method)
        if cached is not None:
            return cached
        if not is_public_method(method):
            raise MethodNotFoundError(f"method {method!r} is not public and cannot be called")
        if not self._is_class and method != "__call__":
            raise MethodNotFoundError(f"function backends only have __call__, not {method!r}")
        if not self._is_class:
            func = self._obj
        elif inspect.isroutine(inspect.getattr_static(self._obj, method, None)):
            func = getattr(self._obj, method)  # looked up statically first: a property never runs
        else:
            public = sorted(
                name for name in dir(type(self._obj))
                if is_public_method(name) and inspect.isroutine(inspect.getattr_static(self._obj, name, None))
            )
            hint = f"; its methods: {', '.join(public)}" if public else ""
            how = " (choose one with handle.options(method_name=...) or X-SERVE-CALL-METHOD)" if public else ""
            raise MethodNotFoundError(f"backend has no method {method!r}{hint}{how}")
        resolved = (func, wants_positional(func))
        self._methods[method] = resolved
        return resolved

    def _run_single(self, call: Call, func: Callable[..., Any], positional: bool) -> Outcome:
        if call.web:
            request = call.requests[0]
            # The HTTP front puts the request id in the environ, which travels with the request
            # to worker processes and Ray actors (str values survive its pickling).
            request_id = request.environ.get(REQUEST_ID_KEY)
        else:
            request, request_id = _PLACEHOLDER, None
        args = (request,) if positional else ()
        try:
            with call_context(call.web, None, request_id):
                return Outcome(True, self._await(func(*args, **call.kwargs[0])))
        except BaseException as exc:  # noqa: BLE001 - see run()
            return Outcome(False, exc)

    def _run_batch(self, call: Call, func: Callable[..., Any], positional: bool) -> list[Outcome]:
        size = len(call)
        requests = list(call.requests) if call.web else [_PLACEHOLDER] * size
        keys = call.kwargs[0].keys()
        if any(kw.keys() != keys for kw in call.kwargs):
            raise ServeTypeError("queries in one batch must pass the same keyword names")
        kwargs = {key: [kw[key] for kw in call.kwargs] for key in keys}
        args = (requests,) if positional else ()
        with call_context(call.web, size):
            result = self._await(func(*args, **kwargs))
        if not isinstance(result, list) or len(result) != size:
            got = f"a list of {len(result)}" if isinstance(result, list) else type(result).__name__
            raise BatchResultError(f"batch backend must return a list of {size} results, got {got}")
        return [Outcome(True, value) for value in result]

    def _await(self, result: Any) -> Any:
        if type(result) in _PLAIN or not inspect.isawaitable(result):
            return result
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(_as_coroutine(result))


async def _as_coroutine(awaitable: Any) -> Any:
    return await awaitable

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

Two ways to run a call: :meth:`Invoker.run` in the replica's thread (a coroutine the backend
returns runs to completion on a private event loop: one call at a time), and
:meth:`Invoker.run_async`, a coroutine for replicas that keep an event loop of their own
(:func:`is_async_target` backends), where several calls run at once as tasks. A call whose
task is cancelled answers :class:`concurrent.futures.CancelledError`, and so does a call there
that lets an ``asyncio.CancelledError`` escape (a ``BaseException`` that callers of
``future.result()`` would not expect); :meth:`Invoker.run` answers what the code raised, as before.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import threading
import types
from collections.abc import Callable
from typing import Any

from .composition import ReplicaScope, enter_call, entered, leave_call
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

_GENERATORS = frozenset({types.GeneratorType, types.AsyncGeneratorType})
"""Results that stream (:class:`Generated`)."""

END: Any = object()
"""What :meth:`Generated.next` returns once the generator is exhausted."""


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


def is_coroutine_callable(func: Any) -> bool:
    """Whether calling ``func`` makes a coroutine or an async generator: an ``async def`` function,
    method or ``__call__`` (such calls run as tasks on an event loop, and can be cancelled)."""
    if _is_async_def(func):
        return True
    call = None if inspect.isroutine(func) else inspect.getattr_static(type(func), "__call__", None)
    return _is_async_def(call)


def _is_async_def(func: Any) -> bool:
    return inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func)


def is_async_target(target: Any) -> bool:
    """Whether a backend has ``async def`` code to serve: such replicas get an event loop of their own.

    A function (or callable object) that is a coroutine function; a class with an ``async def``
    public method, ``__call__`` or ``warmup``. Decided on the class, before any instance exists.
    """
    if not inspect.isclass(target):
        return is_coroutine_callable(target)
    for name in dir(target):
        if not (is_public_method(name) or name == WARMUP_METHOD):
            continue
        member = inspect.getattr_static(target, name, None)
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if _is_async_def(member):
            return True
    return False


def awaits_statically(target: Any, method: str) -> bool:
    """Whether calling ``method`` of a backend (function or class, not built) makes a coroutine.

    What :meth:`Invoker.awaits` answers, read from the class: for a side that has no instance
    (the process executor's parent).
    """
    if not inspect.isclass(target):
        return method == "__call__" and is_coroutine_callable(target)
    member = inspect.getattr_static(target, method, None)
    if isinstance(member, (staticmethod, classmethod)):
        member = member.__func__
    return _is_async_def(member)


class Invoker:
    """Holds one replica's backend object and runs calls on it.

    Args:
        target: the backend's function or class.
        init_args: the class's constructor arguments.
        warmup: run the class's ``warmup`` hook now (on a private event loop when it is a
            coroutine); False leaves it to :meth:`started`, which awaits it on the running loop.
        scope: what the replica is part of: its constructor, hook and calls run inside it, so
            handles and ``serve.get_handle`` there reach its instance (:mod:`serve_core.composition`).
    """

    def __init__(
        self, target: Any, init_args: tuple[Any, ...] = (), *, warmup: bool = True, scope: ReplicaScope | None = None
    ) -> None:
        self._methods: dict[str, tuple[Callable[..., Any], bool]] = {}
        self._coroutines: dict[str, bool] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.scope = scope
        if inspect.isclass(target):
            with entered(scope):
                self._obj: Any = target(*init_args)
                hook = getattr(self._obj, WARMUP_METHOD, None)
                if warmup and callable(hook):  # before the replica is ready, so it gets no call until it returned
                    self._await(hook())
            self._is_class = True
        else:
            self._obj = target
            self._is_class = False

    @classmethod
    async def started(cls, target: Any, init_args: tuple[Any, ...] = (), scope: ReplicaScope | None = None) -> Invoker:
        """Build the backend on the running loop (the replica's own), awaiting its ``warmup`` there.

        The constructor and the hook then see the loop the calls will run on, so what they bind
        to it (a client session, a lock, a queue) works in the calls.
        """
        invoker = cls(target, init_args, warmup=False, scope=scope)
        hook = getattr(invoker._obj, WARMUP_METHOD, None) if invoker._is_class else None
        if callable(hook):
            with entered(scope):
                result = hook()
                if inspect.isawaitable(result):
                    await result
        return invoker

    def awaits(self, method: str) -> bool:
        """Whether ``method`` is a coroutine function (False for a method that cannot be called)."""
        known = self._coroutines.get(method)
        if known is None:
            try:
                known = is_coroutine_callable(self._resolve(method)[0])
            except Exception:  # noqa: BLE001 - the call itself will answer the error
                known = False
            self._coroutines[method] = known
        return known

    def run(self, call: Call) -> list[Outcome]:
        """Run a call; one outcome per query, never raises."""
        token = enter_call(self.scope, call) if self.scope is not None else None
        try:
            func, positional = self._resolve(call.method)
            if call.batched:
                return self._run_batch(call, func, positional)
            return [self._run_single(call, func, positional)]
        except BaseException as exc:  # noqa: BLE001 - every failure becomes an answer, even
            # SystemExit or asyncio.CancelledError raised by user code: the replica must survive.
            return [Outcome(False, exc)] * len(call)
        finally:
            if token is not None:
                leave_call(token)

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
                value = self._await(func(*args, **call.kwargs[0]))
            if type(value) in _GENERATORS:
                value = generated(call, value, request_id)
            return Outcome(True, value)
        except BaseException as exc:  # noqa: BLE001 - see run()
            return Outcome(False, exc)

    def _run_batch(self, call: Call, func: Callable[..., Any], positional: bool) -> list[Outcome]:
        args, kwargs = _batch_arguments(call, positional)
        with call_context(call.web, len(call)):
            result = self._await(func(*args, **kwargs))
        return _batch_outcomes(result, len(call))

    def _await(self, result: Any) -> Any:
        if type(result) in _PLAIN or not inspect.isawaitable(result):
            return result
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        if _loop_running():
            # A running loop in this thread (an inline replica built or called from a coroutine):
            # the private loop cannot run here, so it runs on a helper thread meanwhile.
            return _run_on_helper_thread(self._loop, result)
        return self._loop.run_until_complete(_as_coroutine(result))

    # ------------------------------------------------------------- on a loop
    async def run_async(self, call: Call) -> list[Outcome]:
        """Run a call on the running loop; one outcome per query, never raises.

        A synchronous method runs right here, holding the loop (as on a Ray async actor).
        Cancelling the task running this coroutine cancels the user's coroutine, whose
        queries answer :class:`concurrent.futures.CancelledError`.
        """
        try:
            func, positional = self._resolve(call.method)
            with entered(self.scope, call):  # this task's own context: its calls inherit from this call
                if call.batched:
                    args, kwargs = _batch_arguments(call, positional)
                    with call_context(call.web, len(call)):
                        result = await _awaited(func(*args, **kwargs))
                    return _batch_outcomes(result, len(call))
                return [await self._run_single_async(call, func, positional)]
        except BaseException as exc:  # noqa: BLE001 - see run()
            return [Outcome(False, _as_cancelled(exc))] * len(call)

    async def _run_single_async(self, call: Call, func: Callable[..., Any], positional: bool) -> Outcome:
        if call.web:
            request = call.requests[0]
            request_id = request.environ.get(REQUEST_ID_KEY)
        else:
            request, request_id = _PLACEHOLDER, None
        args = (request,) if positional else ()
        try:
            # Each call runs in a task of its own, with its own copy of the context: the
            # values set here are this call's, whatever else runs on the loop meanwhile.
            with call_context(call.web, None, request_id):
                value = await _awaited(func(*args, **call.kwargs[0]))
            if type(value) in _GENERATORS:
                value = generated(call, value, request_id)
            return Outcome(True, value)
        except BaseException as exc:  # noqa: BLE001 - see run()
            return Outcome(False, _as_cancelled(exc))


class Generated:
    """A generator (or async generator) a call returned, stepped in the call's ``serve.context``.

    The call ran the backend and got a generator; its body runs step by step as the items are
    pulled, by whoever pumps the stream (the replica's thread or loop, or an inline caller).
    """

    __slots__ = ("gen", "is_async", "_web", "_request_id", "_loop", "_steps")

    def __init__(self, gen: Any, web: bool, request_id: str | None) -> None:
        self.gen = gen
        self.is_async = type(gen) is types.AsyncGeneratorType
        self._web = web
        self._request_id = request_id
        self._loop: asyncio.AbstractEventLoop | None = None  # steps an async generator from sync code
        self._steps: contextvars.Context | None = None  # a synchronous generator's steps run in it

    def context(self) -> call_context:
        return call_context(self._web, None, self._request_id)

    def next(self) -> Any:
        """The next item, or :data:`END`; raises what the generator raised (sync callers)."""
        if not self.is_async:
            steps = self._steps
            if steps is None:  # entered once: a step then costs one Context.run, not three variable sets
                steps = self._steps = contextvars.copy_context()
                steps.run(self.context().__enter__)
            return steps.run(next, self.gen, END)
        with self.context():
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            return self._loop.run_until_complete(_anext(self.gen))

    async def anext(self) -> Any:
        """:meth:`next` on the running loop."""
        with self.context():
            if self.is_async:
                return await _anext(self.gen)
            return next(self.gen, END)

    def close(self) -> None:
        """Close the generator (its ``finally`` runs if it had not ended); raises what that raised."""
        try:
            if not self.is_async:
                self.gen.close()
            elif self._loop is None and _loop_running():  # an inline caller inside a coroutine
                asyncio.ensure_future(self.aclose())
            elif self._loop is not None or self.gen.ag_frame is not None:
                loop = self._loop = self._loop or asyncio.new_event_loop()
                with self.context():
                    loop.run_until_complete(self.gen.aclose())
        finally:
            if self._loop is not None:
                self._loop.close()
                self._loop = None

    async def aclose(self) -> None:
        """:meth:`close` on the running loop."""
        with self.context():
            if self.is_async:
                await self.gen.aclose()
            else:
                self.gen.close()


async def _anext(gen: Any) -> Any:
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return END


def generated(call: Call, gen: Any, request_id: str | None) -> Generated:
    """The stream of a call that returned a generator; raises if the call may not stream."""
    if call.stream:
        return Generated(gen, call.web, request_id)
    if type(gen) is types.GeneratorType:
        gen.close()  # never started: nothing of its body ran
    raise ServeTypeError(
        "the backend returned a generator, which streams: call it with handle.options(stream=True).remote(...)"
        + (" (batch calls cannot stream)" if call.batched else "")
    )


def _batch_arguments(call: Call, positional: bool) -> tuple[tuple[Any, ...], dict[str, list[Any]]]:
    """The positional and keyword arguments of a batch call: one list entry per query."""
    size = len(call)
    requests = list(call.requests) if call.web else [_PLACEHOLDER] * size
    keys = call.kwargs[0].keys()
    if any(kw.keys() != keys for kw in call.kwargs):
        raise ServeTypeError("queries in one batch must pass the same keyword names")
    kwargs = {key: [kw[key] for kw in call.kwargs] for key in keys}
    return ((requests,) if positional else ()), kwargs


def _batch_outcomes(result: Any, size: int) -> list[Outcome]:
    if not isinstance(result, list) or len(result) != size:
        got = f"a list of {len(result)}" if isinstance(result, list) else type(result).__name__
        raise BatchResultError(f"batch backend must return a list of {size} results, got {got}")
    return [Outcome(True, value) for value in result]


def cancelled_error() -> concurrent.futures.CancelledError:
    """What a query answers when its running call was cancelled (what ``result()`` raises for a withdrawn one)."""
    return concurrent.futures.CancelledError("the call was cancelled while it ran")


def _as_cancelled(exc: BaseException) -> BaseException:
    # asyncio's CancelledError is a BaseException that callers of future.result() would not
    # expect; the concurrent.futures one is what a cancelled future raises anyway.
    if isinstance(exc, asyncio.CancelledError):
        error = cancelled_error()
        error.__cause__ = exc
        return error
    return exc


async def _awaited(result: Any) -> Any:
    if type(result) in _PLAIN or not inspect.isawaitable(result):
        return result
    return await result


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _run_on_helper_thread(loop: asyncio.AbstractEventLoop, awaitable: Any) -> Any:
    box: list[Any] = []

    def run() -> None:
        try:
            box.append((True, loop.run_until_complete(_as_coroutine(awaitable))))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box.append((False, exc))

    helper = threading.Thread(target=run, name="serve-invoke-await", daemon=True)
    helper.start()
    helper.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value


async def _as_coroutine(awaitable: Any) -> Any:
    return await awaitable

"""Async backends on Ray: an async actor per replica, up to ``max_concurrent_queries`` calls at once.

(An async backend with generator code, which streams, stays on the synchronous actor and its stream
pump: :func:`runs_on_async_actor`.)

An :func:`~serve_core.invoke.is_async_target` backend is built in an :class:`AsyncReplicaActor`,
a Ray *async actor*: Ray runs its methods as tasks on the actor's one event loop, as many at once
as the actor's ``max_concurrency`` (set high: the backend's runtime already bounds the calls a
replica holds, by ``max_concurrent_queries``, 1 unless configured, as on the other executors).
Each call is its own actor call (:class:`RayAsyncReplica`), answered as it ends, in any order;
its ``serve.context`` is its own (each runs in a task with its own context).

Cancellation: :meth:`RayAsyncReplica.cancel` sends the actor ``cancel(number)``, which cancels
that call's task: the backend's coroutine sees ``CancelledError`` at its current ``await``, and
the call answers :class:`concurrent.futures.CancelledError` (a synchronous method of the backend
holds the loop and cannot be cancelled). Best effort, as with ``ray.cancel``: a call that ends
first answers its result.

Faults: when the actor dies, every call it held fails with ``ReplicaDiedError`` (which of them
had started is not tracked, unlike the synchronous actor's progress file: each ran at most
once), and the runtime starts a replacement. No warm spare is kept for async backends.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import pickle
import threading
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from functools import partial
from typing import Any

import ray
from ray import cloudpickle
from ray import exceptions as ray_errors

from ..errors import NotDeliveredError, ReplicaDiedError, ServeError
from ..invoke import Invoker, cancelled_error, is_async_target, is_public_method
from ._outcomes import dump_outcomes
from .base import Call, Outcome
from .ray_actor import HostInfo
from .ray_gateway import LinkInfo
from .ray_progress import process_started_at

ACTOR_MAX_CONCURRENCY = 10_000
"""The async actor's ``max_concurrency``: above any ``max_concurrent_queries``, with room for cancels."""


class AsyncReplicaActor:
    """The object inside an async backend's actor: calls run as tasks on the actor's event loop."""

    def __init__(self) -> None:
        self._invoker: Invoker | None = None
        self._tasks: dict[int, asyncio.Task[list[Outcome]]] = {}

    async def build(self, target: Any, init_args: tuple[Any, ...], link: LinkInfo | None = None) -> HostInfo:
        """Build the backend on the actor's loop (constructor, then an async ``warmup``); errors are reported."""
        error: Exception | None = None
        try:
            scope = link.open() if link is not None else None
            self._invoker = await Invoker.started(target, init_args, scope)
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            error = exc
        pid = os.getpid()
        return HostInfo(ray.get_runtime_context().get_node_id(), pid, process_started_at(pid), "", error)

    async def run(self, number: int, data: bytes) -> bytes | str:
        """Run one pickled call as a task of its own; its pickled outcomes, or why it could not be read."""
        if self._invoker is None:
            raise ServeError("no backend was built in this actor")
        try:
            call: Call = pickle.loads(data)
        except Exception as exc:  # noqa: BLE001 - e.g. a class this process cannot import
            return f"{type(exc).__name__}: {exc}"
        task = asyncio.ensure_future(self._invoker.run_async(call))
        self._tasks[number] = task
        try:
            outcomes = await task
        except asyncio.CancelledError:  # cancelled before its coroutine started
            outcomes = [Outcome(False, cancelled_error())] * len(call)
        finally:
            self._tasks.pop(number, None)
        return dump_outcomes(outcomes, cloudpickle.dumps)

    async def cancel(self, number: int) -> bool:
        """Cancel the task of call ``number``; False when it is not running here."""
        task = self._tasks.get(number)
        if task is None:
            return False
        task.cancel()
        return True


RemoteAsyncReplicaActor: Any = ray.remote(AsyncReplicaActor)


def runs_on_async_actor(target: Any) -> bool:
    """Whether a backend gets an :class:`AsyncReplicaActor`: async code and no generator (a function,
    ``__call__`` or public method that yields): streams run on the synchronous actor's stream pump."""
    if not is_async_target(target):
        return False
    members = [target] if not inspect.isclass(target) else [
        inspect.getattr_static(target, name, None) for name in dir(target) if is_public_method(name)
    ]
    if not inspect.isclass(target) and not inspect.isroutine(target):
        members.append(inspect.getattr_static(type(target), "__call__", None))
    for member in members:
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if inspect.isgeneratorfunction(member) or inspect.isasyncgenfunction(member):
            return False
    return True


class RayAsyncReplica:
    """The driver's side of an async backend's actor: one actor call per call, answered as each ends."""

    default_max_concurrent_queries = 1  # the original's rule; max_concurrent_queries raises it

    def __init__(self, replica_id: str, actor: Any, host: HostInfo, on_stop: Any, actor_name: str = "") -> None:
        self.replica_id = replica_id
        self.node_id = host.node_id
        self.actor_name = actor_name
        self.pid = host.pid
        self._actor = actor
        self._on_stop = on_stop
        self._lock = threading.Lock()
        self._numbers = itertools.count()
        self._calls: dict[int, tuple[Future[list[Outcome]], str]] = {}  # number -> its future, its method
        self._stopped = False
        self._dead = False

    @property
    def alive(self) -> bool:
        return not self._stopped and not self._dead

    @property
    def actor(self) -> Any:
        return self._actor

    def submit(self, call: Call) -> Future[list[Outcome]]:
        future: Future[list[Outcome]] = Future()
        future.set_running_or_notify_cancel()
        try:
            data = cloudpickle.dumps(call, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - e.g. arguments that cannot be pickled
            error = ServeError(f"the call could not be sent to replica {self.replica_id}: {type(exc).__name__}: {exc}")
            future.set_result([Outcome(False, error)] * len(call))
            return future
        with self._lock:
            if not self.alive:
                future.set_exception(NotDeliveredError(f"replica {self.replica_id} was stopped"))
                return future
            number = next(self._numbers)
            self._calls[number] = (future, call.method)
        try:
            ref = self._actor.run.remote(number, data)
        except Exception as exc:  # noqa: BLE001 - Ray refused the call (e.g. it was shut down)
            self._answer(number, NotDeliveredError(f"replica {self.replica_id} could not be reached: {exc}"))
            return future
        ref.future().add_done_callback(partial(self._done, number, len(call)))
        return future

    def cancel(self, future: Future[list[Outcome]]) -> bool:
        """Ask the actor to cancel the task of the call ``submit`` returned ``future`` for."""
        with self._lock:
            number = next((n for n, (f, _) in self._calls.items() if f is future), None)
        if number is None or not self.alive:
            return False
        try:
            self._actor.cancel.remote(number)
        except Exception:  # noqa: BLE001 - the actor is gone: its calls fail with ReplicaDiedError
            return False
        return True

    def _done(self, number: int, size: int, reply: Future[Any]) -> None:
        try:
            answer = reply.result()
        except ray_errors.RayActorError as exc:
            self._dead = True
            self._answer(number, ReplicaDiedError(f"replica {self.replica_id} (Ray actor) died: {exc}"))
            return
        except Exception as exc:  # noqa: BLE001 - Ray failed the call
            self._answer(number, ReplicaDiedError(f"the call to replica {self.replica_id} failed in Ray: {exc}"))
            return
        if isinstance(answer, str):
            error = ServeError(f"replica {self.replica_id} could not read the call: {answer}")
            self._answer(number, [Outcome(False, error)] * size)
            return
        try:
            outcomes: list[Outcome] = pickle.loads(answer)
        except Exception as exc:  # noqa: BLE001 - e.g. a result class this process cannot import
            error = ServeError(f"the results of replica {self.replica_id} could not be read: {exc}")
            outcomes = [Outcome(False, error)] * size
        self._answer(number, outcomes)

    def _answer(self, number: int, result: list[Outcome] | BaseException) -> None:
        with self._lock:
            entry = self._calls.pop(number, None)
        if entry is None:
            return
        if isinstance(result, BaseException):
            entry[0].set_exception(result)
        else:
            entry[0].set_result(result)

    def stop(self, drain_timeout: float | None = None) -> None:
        """Let the calls held finish (up to ``drain_timeout``), then kill the actor; what is left fails."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            pending = [future for future, _ in self._calls.values()]
        if pending and drain_timeout != 0:
            wait_futures(pending, timeout=drain_timeout)
        try:
            if ray.is_initialized():
                ray.kill(self._actor, no_restart=True)
        except Exception:  # noqa: BLE001 - Ray may already be gone
            pass
        with self._lock:
            left, self._calls = list(self._calls.values()), {}
        for future, _ in left:  # answered here: a killed actor's replies may never come once Ray is down
            future.set_exception(ReplicaDiedError(f"replica {self.replica_id} was stopped before the call ended"))
        self._on_stop(self)

    def __repr__(self) -> str:
        return f"<RayAsyncReplica {self.replica_id} pid={self.pid} {'alive' if self.alive else 'gone'}>"

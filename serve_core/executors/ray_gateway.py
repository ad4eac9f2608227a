"""Composed calls on Ray: from replica actors, through a gateway actor, to the driver's router.

A Ray replica's handles cannot reach the driver's router directly (an actor cannot call the
driver), and calling the target replicas directly would skip the queue, the traffic split and
the SLO order. So each instance that runs Ray replicas has one small :class:`Gateway` actor
(async, ``num_cpus=0``, unnamed, anywhere on the cluster, reachable from every node through Ray;
started with the instance's first Ray replica, killed with the executor):

* a replica's :class:`GatewayLink` sends a call as ``gateway.call(caller, number, data)`` (the
  same :class:`~._nested.Nested` message a process worker sends its parent); that actor call
  returns once the call is answered, with its outcome;
* the driver's :class:`GatewayPump` thread long-polls ``gateway.take`` and hands each message to a
  :class:`~._nested.NestedCalls` per caller, which enqueues it on the instance's router and sends
  the outcome back with ``gateway.answer``.

So a composed call costs four Ray messages more than a direct one (bench/bench_compose.py), and
keeps everything a call made on the driver has. Cancelling it (``future.cancel()`` in the
replica) sends a :class:`~._nested.NestedCancel` the same way. When the gateway dies, the calls
waiting on it fail with ``ReplicaDiedError``; when a replica dies, the answers to its calls are
dropped by the gateway.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from concurrent.futures import Future
from functools import partial
from typing import Any

import ray
from ray import exceptions as ray_errors

from ..composition import ReplicaScope, enter_worker
from ..errors import ReplicaDiedError
from ._nested import NESTED, NestedCalls, ParentLink
from ._outcomes import dump_outcomes
from ._wire import SEQ
from .base import Outcome

log = logging.getLogger("serve_core")

TAKE_TIMEOUT_S = 1.0
"""How long one ``take`` waits for messages: the pump checks for its stop this often."""


class Gateway:
    """The gateway actor: holds replicas' composed calls until the driver answers them."""

    def __init__(self) -> None:
        self._inbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._waiting: dict[tuple[str, int], asyncio.Future[bytes]] = {}

    async def call(self, caller: str, number: int, data: bytes) -> bytes:
        """A replica's call (``data`` is a pickled ``Nested``); returns its answer once the driver sent it."""
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[(caller, number)] = answer
        self._inbox.put_nowait((caller, data))
        try:
            return await answer
        finally:
            self._waiting.pop((caller, number), None)

    async def cancel(self, caller: str, data: bytes) -> None:
        """A replica cancelled one of its calls (``data`` is a pickled ``NestedCancel``)."""
        self._inbox.put_nowait((caller, data))

    async def take(self, timeout: float) -> list[tuple[str, bytes]]:
        """The messages waiting for the driver; waits up to ``timeout`` seconds for the first one."""
        try:
            first = await asyncio.wait_for(self._inbox.get(), timeout)
        except asyncio.TimeoutError:
            return []
        taken = [first]
        while not self._inbox.empty():
            taken.append(self._inbox.get_nowait())
        return taken

    async def answer(self, caller: str, data: bytes) -> None:
        """The driver's answer to one call (``NESTED`` + its number + its outcomes)."""
        number = SEQ.unpack_from(data, len(NESTED))[0]
        waiting = self._waiting.get((caller, number))
        if waiting is not None and not waiting.done():
            waiting.set_result(data)


_RemoteGateway: Any = ray.remote(num_cpus=0, max_restarts=0)(Gateway)


@dataclasses.dataclass(frozen=True)
class LinkInfo:
    """What a replica actor needs to call its instance: sent with its backend at build time."""

    gateway: Any  # the Gateway actor's handle
    instance_id: str
    backend_tag: str
    caller: str  # the replica's id: the gateway's key for its calls

    def open(self) -> ReplicaScope:
        """In the actor: the replica's scope, its link through the gateway (also for the backend's threads)."""
        scope = ReplicaScope(GatewayLink(self), self.backend_tag)
        enter_worker(scope)
        return scope


class GatewayLink(ParentLink):
    """A replica actor's link to its instance: composed calls travel through the gateway."""

    def __init__(self, info: LinkInfo) -> None:
        super().__init__(info.instance_id, self._unused)
        self._gateway = info.gateway
        self._caller = info.caller

    def _unused(self, data: bytes) -> None:
        raise AssertionError("a gateway link sends through _send_call and _send_cancel")

    def _send_call(self, number: int, data: bytes) -> None:
        try:
            ref = self._gateway.call.remote(self._caller, number, data)
        except Exception as exc:  # noqa: BLE001 - Ray refused the call
            self._fail(number, exc)
            return
        ref.future().add_done_callback(partial(self._answered, number))

    def _send_cancel(self, number: int, data: bytes) -> None:
        self._gateway.cancel.remote(self._caller, data)

    def _answered(self, number: int, future: Future[bytes]) -> None:
        try:
            data = future.result()
        except Exception as exc:  # noqa: BLE001 - the gateway died, or Ray failed
            self._fail(number, exc)
            return
        self.deliver(memoryview(data)[len(NESTED):])

    def _fail(self, number: int, exc: BaseException) -> None:
        error = ReplicaDiedError(f"the gateway of the instance could not be reached: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        self.deliver(memoryview(SEQ.pack(number) + dump_outcomes([Outcome(False, error)])))


class GatewayPump:
    """The driver's side: one gateway actor and the thread that serves its messages.

    Args:
        scope: the instance whose router takes the calls.
    """

    def __init__(self, scope: ReplicaScope) -> None:
        self._scope = scope
        # Not named: it is the instance's plumbing, reached by its handle (sent with each replica's backend).
        self.actor = _RemoteGateway.remote()
        self._callers: dict[str, NestedCalls] = {}
        self._lock = threading.Lock()  # _callers: the pump thread adds, stopping replicas remove
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serve_core-ray-gateway", daemon=True)
        self._thread.start()

    def link_info(self, backend_tag: str, caller: str) -> LinkInfo:
        return LinkInfo(self.actor, self._scope.link.instance_id, backend_tag, caller)

    def _run(self) -> None:
        while not self._stopping.is_set() and ray.is_initialized():
            try:
                taken = ray.get(self.actor.take.remote(TAKE_TIMEOUT_S))
            except (ray_errors.RayError, SystemExit) as exc:
                if not self._stopping.is_set():
                    log.warning("the gateway actor of composed Ray calls failed: %s", exc)
                return
            for caller, data in taken:
                self._calls(caller).receive(memoryview(data))  # a pickled Nested or NestedCancel

    def _calls(self, caller: str) -> NestedCalls:
        with self._lock:
            calls = self._callers.get(caller)
            if calls is None:
                calls = self._callers[caller] = NestedCalls(self._scope, partial(self._answer, caller))
            return calls

    def _answer(self, caller: str, data: bytes) -> bool:
        try:
            self.actor.answer.remote(caller, data)
        except Exception:  # noqa: BLE001 - Ray is shutting down: the caller is gone too
            return False
        return True

    def forget(self, caller: str) -> None:
        """A replica stopped: its calls still out are cancelled (nobody waits for them)."""
        with self._lock:
            calls = self._callers.pop(caller, None)
        if calls is not None:
            calls.cancel_all()

    def stop(self) -> None:
        self._stopping.set()
        if ray.is_initialized():
            ray.kill(self.actor, no_restart=True)
        self._thread.join()

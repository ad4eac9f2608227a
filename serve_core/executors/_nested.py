"""Composed calls from a process-executor worker: sent to the parent, queued on its router.

A handle used inside a worker's replica sends its call to the parent over the worker's pipe
(:class:`ParentLink`); the parent enqueues it on its instance's router, as a call made in the
parent would be, and sends the outcome back when it is answered (:class:`NestedCalls`). Both
directions mark these messages with :data:`NESTED` in front, which no other message starts
with (pickles start with ``\\x80``; a concurrent worker's answers with their call number,
never ``2**64 - 1``):

* worker to parent: ``NESTED`` + a pickled :class:`Nested` (a call) or :class:`NestedCancel`;
* parent to worker: ``NESTED`` + :data:`~._wire.SEQ` (the call's number) + its pickled outcomes.

In the worker, answers may come while the only thread that reads the pipe is inside the
backend, waiting for one of them. So the pipe is read through an :class:`Inbox`: whichever
thread needs a message reads the next one; an answer is delivered at once, anything else
waits in a backlog for the worker's loop. While calls are out, a pump thread reads too.

Exactly once: every :class:`Nested` gets one answer (its future's outcome, or the error
``enqueue`` raised); a worker whose pipe ends fails the calls still out.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import pickle
import threading
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from ..errors import ReplicaDiedError, ServeTypeError
from ..queues import ServeFuture
from ..slo import NO_SLO, SLO
from ._outcomes import dump_outcomes
from ._wire import SEQ, dumps
from .base import Outcome

if TYPE_CHECKING:
    from ..composition import Origin, ReplicaScope

log = logging.getLogger("serve_core")

NESTED = b"\xff" * SEQ.size
"""The mark in front of a composed call's messages."""

EARLY_CANCELS_KEPT = 1_024
"""Cancels remembered for calls not seen yet (Ray may deliver a cancel before its call); the oldest go first."""


@dataclasses.dataclass(frozen=True)
class Nested:
    """A call made inside the worker's replica, numbered by the worker."""

    number: int
    endpoint: str
    method: str
    kwargs: dict[str, Any]
    slo: SLO
    shard_key: str | None
    origin: Origin | None


@dataclasses.dataclass(frozen=True)
class NestedCancel:
    """The worker's code cancelled its call ``number``: cancel it in the parent (withdrawn if queued)."""

    number: int


# ---------------------------------------------------------------- the worker's side
class Inbox:
    """The worker's end of its pipe, read by whichever thread needs the next message.

    Args:
        conn: the pipe.
        deliver: called with an answer to a composed call (the bytes after :data:`NESTED`).
    """

    def __init__(self, conn: Connection, deliver: Callable[[memoryview], None]) -> None:
        self._conn = conn
        self._deliver = deliver
        self._cond = threading.Condition(threading.Lock())  # a plain lock: taken twice per message
        self._reading = False
        self._ended = False
        self._backlog: collections.deque[bytes] = collections.deque()
        self._outstanding = 0  # composed calls not answered yet
        self._pump: threading.Thread | None = None

    def next_message(self) -> bytes | None:
        """The next message that is not an answer to a composed call; None once the pipe ended."""
        with self._cond:
            while not self._backlog:
                if self._ended:
                    return None
                if self._reading:
                    self._cond.wait()
                else:
                    self._read_one()
            return self._backlog.popleft()

    def poll(self, timeout: float | None) -> bool:
        """Whether :meth:`next_message` would return at once, waiting up to ``timeout`` (``None``: for ever)."""
        with self._cond:
            while not self._backlog and not self._ended:
                if self._reading:
                    if timeout is not None:
                        self._cond.wait(timeout)
                        return bool(self._backlog) or self._ended
                    self._cond.wait()
                elif timeout is not None and not self._conn.poll(timeout):
                    return False
                else:
                    self._read_one()  # an answer to a composed call is delivered; then look again
            return True

    def sent(self) -> None:
        """A composed call left: read until it is answered, whatever the worker's loop does meanwhile."""
        with self._cond:
            self._outstanding += 1
            if self._pump is None:
                self._pump = threading.Thread(target=self._pump_loop, name="serve-nested-pump", daemon=True)
                self._pump.start()
            self._cond.notify_all()

    def answered(self) -> None:
        with self._cond:
            self._outstanding -= 1

    @property
    def ended(self) -> bool:
        return self._ended

    def _pump_loop(self) -> None:
        with self._cond:
            while not self._ended:
                if self._outstanding and not self._reading:
                    self._read_one()
                else:
                    self._cond.wait()

    def _read_one(self) -> None:
        """Read one message, with the condition held on entry and exit (released while reading)."""
        self._reading = True
        self._cond.release()
        answer: bytes | None = None
        try:
            data: bytes | None = self._conn.recv_bytes()
        except (EOFError, OSError):
            data = None
        if data is not None and data.startswith(NESTED):
            answer, data = data, None
            self._deliver(memoryview(answer)[len(NESTED):])
        self._cond.acquire()
        self._reading = False
        if answer is None:
            if data is None:
                self._ended = True
            else:
                self._backlog.append(data)
        if self._pump is not None:  # without a pump only the worker's loop reads: nobody waits
            self._cond.notify_all()


class ParentLink:
    """A worker's link to its parent's instance: what handles inside the worker's replica call through.

    Args:
        instance_id: the parent instance's id.
        send: sends bytes to the parent (serialised with the worker's other sends).
    """

    def __init__(self, instance_id: str, send: Callable[[bytes], None]) -> None:
        self._instance_id = instance_id
        self._send = send
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self._calls: dict[int, ServeFuture] = {}
        self.inbox: Inbox | None = None  # set by the worker before the backend runs

    @property
    def instance_id(self) -> str:
        return self._instance_id

    def enqueue(
        self,
        endpoint_name: str,
        *,
        kwargs: dict[str, Any] | None = None,
        method_name: str = "__call__",
        slo: SLO = NO_SLO,
        shard_key: str | None = None,
        stream: bool = False,
        origin: Origin | None = None,
    ) -> ServeFuture:
        """Send the call to the parent; the future resolves with its answer.

        Raises:
            ServeTypeError: the arguments cannot be pickled, or ``stream=True`` (a composed call
                from another process does not stream: call without ``stream``).
            ReplicaDiedError: the pipe to the parent has ended.
        """
        if stream:
            raise ServeTypeError(
                f"a streaming call to endpoint {endpoint_name!r} cannot be made from a replica in another "
                "process (process or Ray executor) yet; call it without stream=True"
            )
        number = next(self._numbers)
        message = Nested(number, endpoint_name, method_name, kwargs or {}, slo, shard_key, origin)
        try:
            data = dumps(message)
        except Exception as exc:  # noqa: BLE001
            raise ServeTypeError(
                f"the call to endpoint {endpoint_name!r} cannot be sent to the parent process "
                f"({type(exc).__name__}: {exc}); pass picklable arguments"
            ) from exc
        inbox = self.inbox
        if inbox is not None and inbox.ended:
            raise ReplicaDiedError("the worker's pipe to its parent has ended; no more calls from it")
        future = ServeFuture()
        future.set_running_or_notify_cancel()  # so that cancel() asks the parent (the canceller below)
        with self._lock:
            self._calls[number] = future
        if inbox is not None:
            inbox.sent()
        self._send_call(number, data)
        future.set_canceller(partial(self._cancel, number))
        return future

    def _send_call(self, number: int, data: bytes) -> None:
        self._send(NESTED + data)

    def _send_cancel(self, number: int, data: bytes) -> None:
        self._send(NESTED + data)

    def _cancel(self, number: int) -> bool:
        with self._lock:
            if number not in self._calls:
                return False
        self._send_cancel(number, dumps(NestedCancel(number)))
        return True

    def deliver(self, data: memoryview) -> None:
        """An answer from the parent (on whichever thread read it)."""
        number = SEQ.unpack_from(data)[0]
        try:
            outcome: Outcome = pickle.loads(data[SEQ.size:])[0]
        except Exception as exc:  # noqa: BLE001 - e.g. a result class unknown in this process
            outcome = Outcome(False, ReplicaDiedError(f"the answer to a composed call could not be read: {exc!r}"))
        with self._lock:
            future = self._calls.pop(number, None)
        if future is None:
            return
        if self.inbox is not None:
            self.inbox.answered()
        if outcome.ok:
            future.set_result(outcome.value)
        else:
            future.set_exception(outcome.value)

    def fail_all(self) -> None:
        """The pipe ended: the calls still out fail (the worker is about to exit)."""
        with self._lock:
            futures, self._calls = list(self._calls.values()), {}
        for future in futures:
            future.set_exception(ReplicaDiedError("the worker's parent went away before answering the call"))


class WorkerPipe:
    """A worker's pipe: sends serialised, reads through an :class:`Inbox` when its replica can compose.

    Args:
        conn: the pipe to the parent.
        instance_id: the parent instance's id ("" when the replica has none: no composed calls).
    """

    def __init__(self, conn: Connection, instance_id: str) -> None:
        self._conn = conn
        self._send_lock = threading.Lock()
        self.link: ParentLink | None = None
        self._inbox: Inbox | None = None
        if instance_id:
            self.link = ParentLink(instance_id, self.send)
            self._inbox = self.link.inbox = Inbox(conn, self.link.deliver)

    def recv_bytes(self) -> bytes:
        """The next message for the worker's loop (not an answer to a composed call).

        Raises:
            EOFError: the pipe has ended.
        """
        if self._inbox is None:
            return self._conn.recv_bytes()
        data = self._inbox.next_message()
        if data is None:
            if self.link is not None:
                self.link.fail_all()
            raise EOFError
        return data

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Whether :meth:`recv_bytes` has a message (or the end) for the worker's loop, waiting up to
        ``timeout`` seconds (``None``: until it has)."""
        if self._inbox is None:
            return self._conn.poll(timeout)
        return self._inbox.poll(timeout)

    def send_bytes(self, data: bytes) -> None:
        """Send ``data``; a pipe that has ended is ignored (the parent is gone: the watchdog ends the worker)."""
        with self._send_lock:
            try:
                self._conn.send_bytes(data)
            except OSError:
                pass

    send = send_bytes


# ---------------------------------------------------------------- the parent's side
class NestedCalls:
    """A process replica's side of composed calls: enqueues them on the instance, sends answers back.

    Args:
        scope: the replica's scope (its instance's link); None refuses composed calls.
        send: sends bytes to the worker; returns False when the worker is gone.
    """

    def __init__(self, scope: ReplicaScope | None, send: Callable[[bytes], bool]) -> None:
        self._scope = scope
        self._send = send
        self._lock = threading.Lock()
        self._futures: dict[int, Future[Any]] = {}
        # Numbers cancelled before their call came (through Ray's gateway, a cancel may overtake
        # its call): the call is answered cancelled when it comes. Numbers are never reused.
        self._early: dict[int, None] = {}

    def receive(self, payload: memoryview) -> None:
        """A composed-call message from the worker (the bytes after :data:`NESTED`), on the reader thread."""
        try:
            message = pickle.loads(payload)
        except Exception:  # noqa: BLE001 - our own worker wrote it; never kill the reader over it
            log.exception("a composed call from a worker could not be read")
            return
        if isinstance(message, NestedCancel):
            with self._lock:
                future = self._futures.get(message.number)
                if future is None:  # not come yet (or answered already: then never looked up)
                    self._early[message.number] = None
                    if len(self._early) > EARLY_CANCELS_KEPT:
                        del self._early[next(iter(self._early))]
            if future is not None:
                future.cancel()
            return
        number = message.number
        with self._lock:
            cancelled = number in self._early
            if cancelled:
                del self._early[number]
        if cancelled:
            self._answer(number, Outcome(False, concurrent.futures.CancelledError()))
            return
        try:
            if self._scope is None:
                raise ServeTypeError("this replica was started without an instance to call")
            future = self._scope.link.enqueue(
                message.endpoint, kwargs=message.kwargs, method_name=message.method, slo=message.slo,
                shard_key=message.shard_key, origin=message.origin,
            )
        except BaseException as exc:  # noqa: BLE001 - answered to the worker, which raises it there
            self._answer(number, Outcome(False, exc))
            return
        with self._lock:
            self._futures[number] = future
        future.add_done_callback(partial(self._done, number))

    def _done(self, number: int, future: Future[Any]) -> None:
        with self._lock:
            self._futures.pop(number, None)
        try:
            outcome = Outcome(True, future.result())
        except BaseException as exc:  # noqa: BLE001 - CancelledError included
            outcome = Outcome(False, exc)
        self._answer(number, outcome)

    def _answer(self, number: int, outcome: Outcome) -> None:
        self._send(NESTED + SEQ.pack(number) + dump_outcomes([outcome]))

    def cancel_all(self) -> None:
        """The worker is gone: nobody waits for its composed calls any more."""
        with self._lock:
            futures, self._futures = list(self._futures.values()), {}
        for future in futures:
            future.cancel()

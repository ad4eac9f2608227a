"""The parent's side of a Ray replica: sends calls to its actor, reads the answers, and its death.

Calls submitted together travel together: a replica keeps at most
:data:`MESSAGES_IN_FLIGHT` actor calls ("messages") out, and what is submitted while they
are out leaves as one message when one comes back. The actor runs the calls in the order
sent, a time slice per message (:mod:`.ray_actor`), so a reply answers the oldest calls
the actor holds, as many as it ran; what it holds beyond them is run by its next message
(an empty one is sent if none is out).

Replies are read by one thread per replica, which blocks in ``ray.get`` on the oldest
message (a blocking ``ray.get`` wakes sooner than Ray's completion callbacks, and one
thread per replica, not per request, bounds the cost).

Faults: when the actor dies, the replica reads its progress file (:func:`.ray_actor.read_progress`)
and answers each call it held by where the actor had got to. A call it had finished but
whose answer was lost, and the call it was running, fail with
:class:`~serve_core.errors.ReplicaDiedError`; calls it had not started, and those still in
the outbox, fail with :class:`~serve_core.errors.NotDeliveredError`, which puts them back
in the backend's queue for the replacement. When the progress cannot be read (the node
is gone), every call the actor held fails: a call runs at most once.
"""

from __future__ import annotations

import io
import logging
import pickle
import threading
from collections import deque
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any

import ray
from ray import cloudpickle
from ray import exceptions as ray_errors

from ..errors import NotDeliveredError, ReplicaDiedError, ServeError
from ._wire import StreamOpened
from .base import Call, Outcome
from .ray_actor import HostInfo
from .ray_progress import Progress, fate, first_line, forget, read_dead, summary
from .ray_stream import pull_stream

log = logging.getLogger("serve_core")

Pending = tuple[Call, "Future[list[Outcome]]"]

MESSAGES_IN_FLIGHT = 2
"""Actor calls a replica keeps in flight; calls submitted beyond that are coalesced.

Two keep the actor busy: it runs one message while the next waits in its mailbox.
Calls that arrive meanwhile wait in the replica's outbox and leave together, as one
actor call, when a message comes back; under load one Ray round trip then carries
many calls, while a lone call still leaves at once.
"""

DEFAULT_MAX_CONCURRENT_QUERIES = 32
"""Calls a Ray replica holds when the backend config leaves it to the executor.

A round trip to an actor costs far more than a no-op call, so with one call at a
time the actor would mostly wait. Thirty-two keep it busy (``bench/bench_ray.py``) while
bounding how long a query with an earlier deadline can wait behind calls already
sent. ``max_concurrent_queries=1`` gives the original's strict rule.
"""

STOP_JOIN_TIMEOUT_S = 30.0
"""How long ``stop`` waits for a replica's reply reader once the actor is killed."""

RAY_CHECK_INTERVAL_S = 1.0
"""How often a reader waiting for a reply checks that Ray is still running.

A ``ray.get`` under way when someone else calls ``ray.shutdown()`` would wait forever.
"""

class RayReplica:
    """One backend replica in a Ray actor (see the module docstring)."""

    default_max_concurrent_queries = DEFAULT_MAX_CONCURRENT_QUERIES
    serial = True  # the actor runs what it holds one by one (executors.base.SERIAL_ATTRIBUTE)

    def __init__(
        self, replica_id: str, actor: Any, host: HostInfo, local_node: str | None, on_stop: Any, actor_name: str = ""
    ) -> None:
        self.replica_id = replica_id
        self.node_id = host.node_id
        self.actor_name = actor_name  # its Ray actor's name: <prefix>:<replica id>, or <prefix>:spare-<n>
        self._actor = actor
        self._host = host
        self._local = host.node_id == local_node  # its progress file is readable from here
        self._on_stop = on_stop
        self._lock = threading.Lock()  # the state below; never held while calling Ray
        self._replied = threading.Condition(self._lock)  # a message was sent, or one ended
        # Held from taking calls out of the outbox until their message is listed in _sent, so
        # messages leave, and are read, in the order submitted. Re-entrant: a message that
        # fails to leave ends at once, and its end sends what waits.
        self._send_lock = threading.RLock()
        self._pickler = _CallPickler()  # used under the send lock
        self._messages = 0  # actor calls out, counted from before they are sent
        self.actor_calls = 0  # actor calls made so far (for diagnostics and tests)
        self._outbox: list[Pending] = []
        self._held: deque[Pending] = deque()  # sent to the actor and not answered, oldest first
        self._answered = 0  # calls of the actor answered so far: the actor's index of _held[0]
        self._sent: deque[Any] = deque()  # ObjectRefs of the messages out, oldest first
        self._in_flight: set[Future[list[Outcome]]] = set()
        self._stopped = False
        self._stop_when_read = False  # stop() ran on the reader: it ends the actor itself
        self._dead = False
        self._reader = threading.Thread(target=self._read_replies, name=f"serve_core-ray-{replica_id}", daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        return not self._stopped and not self._dead

    @property
    def actor(self) -> Any:
        """The Ray actor handle (for tests and diagnostics)."""
        return self._actor

    @property
    def pid(self) -> int:
        """The actor's process id, on its node."""
        return self._host.pid

    # ---------------------------------------------------------------- sending
    def submit(self, call: Call) -> Future[list[Outcome]]:
        future: Future[list[Outcome]] = Future()
        future.set_running_or_notify_cancel()
        with self._send_lock:
            with self._lock:
                alive = self.alive
                if alive:
                    self._in_flight.add(future)
                    self._outbox.append((call, future))
            if alive:
                self._send_outbox()
        if not alive:
            future.set_exception(NotDeliveredError(f"replica {self.replica_id} was stopped"))
        return future

    def _send_outbox(self) -> None:
        """Send what waits in the outbox as one message, unless enough are out already.

        With nothing out, a message also leaves empty when the actor holds calls left
        over from a time slice: the actor runs them only when a message comes.
        """
        with self._send_lock:
            with self._lock:
                if self._dead or self._messages >= MESSAGES_IN_FLIGHT:
                    return
                if not self._outbox and not (self._held and not self._messages):
                    return
                message, self._outbox = self._outbox, []
                self._messages += 1
            self._send(message)

    def _send(self, message: list[Pending]) -> None:
        """One actor call carrying ``message``; never raises (every call gets an answer).

        Each call is pickled on its own, so one that cannot be sent fails alone.
        """
        sendable: list[Pending] = []
        blobs: list[bytes] = []
        pickler = self._pickler  # ours alone: messages are sent under the send lock
        for call, future in message:
            try:
                blobs.append(pickler.dumps(call))
            except Exception as exc:  # noqa: BLE001 - e.g. arguments that cannot be pickled
                self._resolve(future, _failed(call, f"the call could not be sent to replica {self.replica_id}", exc))
            else:
                sendable.append((call, future))
        with self._lock:
            empty = not blobs and not (self._held and self._messages == 1)  # no calls, nothing to go on with
        if empty:
            self._message_ended()
            self._send_outbox()
            return
        try:
            # A lone call travels bare: Ray carries one bytes argument faster than a list.
            ref = self._actor.run_one.remote(blobs[0]) if len(blobs) == 1 else self._actor.run.remote(blobs)
        except Exception as exc:  # noqa: BLE001 - Ray refused the call (e.g. it was shut down)
            self._message_ended()
            self._unsent(sendable, exc)
            self._died(exc)
            return
        with self._lock:
            dead = self._dead
            if not dead:
                self.actor_calls += 1
                self._held.extend(sendable)
                self._sent.append(ref)
                self._replied.notify()
        if dead:  # its death was read meanwhile: the actor was gone before this message
            self._message_ended()
            self._unsent(sendable, ReplicaDiedError(f"replica {self.replica_id} died"))

    def _message_ended(self) -> None:
        with self._lock:
            self._messages -= 1
            self._replied.notify()  # the reader may be waiting for the last message to end

    def _unsent(self, pending: list[Pending], error: BaseException) -> None:
        for _, future in pending:
            gone = NotDeliveredError(f"replica {self.replica_id} could not be reached: {first_line(error)}")
            gone.__cause__ = error
            self._resolve(future, gone)

    # ---------------------------------------------------------------- replies
    def _read_replies(self) -> None:
        """The reader thread: hands each message's reply to :meth:`_on_reply`, oldest first.

        Ends once the replica is stopped and every message has ended (``stop`` kills the
        actor first, so a reply still awaited then arrives, as the actor's death).
        """
        while (ref := self._oldest_sent()) is not None:
            reply: Any
            try:
                reply = _wait_for(ref)
            except Exception as exc:  # noqa: BLE001 - the actor died, or Ray itself failed
                reply = exc
            with self._lock:
                self._sent.popleft()
                dead = self._dead
            self._message_ended()
            if dead:
                continue  # its calls were answered when the death was read
            if isinstance(reply, BaseException):
                self._died(reply)
            else:
                self._on_reply(reply)
        if self._stop_when_read:
            self._end()
            self._on_stop(self)

    def _oldest_sent(self) -> Any:
        """The oldest message out, once there is one; None once stopped with none left."""
        with self._replied:
            while not self._sent:
                if self._stopped and not self._messages:
                    return None
                self._replied.wait()
            return self._sent[0]

    def _on_reply(self, reply: Any) -> None:
        """The actor answered its oldest calls, as many as it ran; what waits leaves first."""
        answers = reply if isinstance(reply, list) else [reply]
        with self._lock:
            count = len(answers)
            if count > len(self._held):
                done: list[Pending] = []
            else:
                done = [self._held.popleft() for _ in range(count)]
                self._answered += count
        if count and not done:
            self._died(ServeError(f"the actor answered {count} calls but held {len(self._held)}"))
            return
        self._send_outbox()  # first, so the actor stays busy
        for (call, future), answer in zip(done, answers):
            outcomes = self._decode(call, answer)
            if len(outcomes) == 1 and type(outcomes[0].value) is StreamOpened:  # pulled from here on
                outcomes = [Outcome(True, pull_stream(self._actor, outcomes[0].value, self.replica_id))]
            self._resolve(future, outcomes)

    def _decode(self, call: Call, answer: Any) -> list[Outcome]:
        if isinstance(answer, str):
            return _failed(call, f"replica {self.replica_id} could not read the call", ServeError(answer))
        try:
            outcomes: list[Outcome] = pickle.loads(answer)
        except Exception as exc:  # noqa: BLE001 - e.g. a result class this process cannot import
            return _failed(call, f"the results of replica {self.replica_id} could not be read", exc)
        return outcomes

    # ------------------------------------------------------------------ death
    def _died(self, error: BaseException) -> None:
        """The actor is gone, or broken: kill it, then answer what it held by its progress.

        Killed in any case: Ray may only have lost touch with it, or it answered wrongly,
        and its counters must not move once read. The calls held are taken under the
        send lock, so that a message on its way is counted among them (the kill comes
        after: it may have started).
        """
        with self._send_lock, self._lock:
            if self._dead:
                return
            self._dead = True
            held, self._held = list(self._held), deque()
            unsent, self._outbox = self._outbox, []
            first = self._answered
            self._replied.notify()
        self._kill()
        host = self._host
        if held:
            progress = read_dead(host.progress_path, host.pid, host.started_at, host.node_id, self._local)
        else:
            forget(host.progress_path, host.node_id, self._local)
            progress = Progress(first, first)
        for index, (_, future) in enumerate(held, start=first):
            self._resolve(future, fate(self.replica_id, index, progress, error))
        self._unsent(unsent, error)
        if not self._stopped:
            log.warning(
                "replica %s (Ray actor) died holding %d calls (%s): %s",
                self.replica_id, len(held), summary(first, len(held), progress), first_line(error),
            )

    def _resolve(self, future: Future[list[Outcome]], result: list[Outcome] | BaseException) -> None:
        with self._lock:
            self._in_flight.discard(future)
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    # ------------------------------------------------------------------- stop
    def stop(self, drain_timeout: float | None = None) -> None:
        """Let the calls out finish (up to ``drain_timeout``), then kill the actor.

        Calls it holds then and had not started go back to the queue. Called from a
        reply's callback, so on the reader thread, which alone can answer the calls
        still out, it returns at once: the reader kills the actor once they are answered.
        """
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._stop_when_read = threading.current_thread() is self._reader
            self._replied.notify()
            pending = list(self._in_flight)
        if self._stop_when_read:
            return
        if pending:
            wait_futures(pending, timeout=drain_timeout)
        self._end()
        self._reader.join(STOP_JOIN_TIMEOUT_S)
        if self._reader.is_alive():
            log.warning("replica %s: Ray did not report its killed actor in %s s", self.replica_id, STOP_JOIN_TIMEOUT_S)
        self._on_stop(self)

    def _end(self) -> None:
        """Kill the actor; what it held and had not started, and the outbox, go back to the queue."""
        self._died(ReplicaDiedError(f"replica {self.replica_id} was stopped"))

    def _kill(self) -> None:
        try:
            if ray.is_initialized():  # else ray.kill would start a new Ray, and the actor is gone anyway
                ray.kill(self._actor, no_restart=True)
        except Exception:  # noqa: BLE001 - Ray may already be gone; nothing left to stop
            log.debug("killing the actor of replica %s failed", self.replica_id, exc_info=True)

    def __repr__(self) -> str:
        return f"<RayReplica {self.replica_id} pid={self._host.pid} {'alive' if self.alive else 'gone'}>"


_PLAIN = frozenset({type(None), bool, int, float, str, bytes})
"""Argument types that the C pickler writes exactly as cloudpickle would (no code, no classes)."""


def _plain(call: Call) -> bool:
    """Whether a Python call carries only plain values: then the C pickler is enough (5x faster)."""
    if call.web:
        return False
    for kwargs in call.kwargs:
        for value in kwargs.values():
            if type(value) not in _PLAIN:
                return False
    return all(request is None for request in call.requests)


class _CallPickler:
    """Pickles calls one by one with Ray's cloudpickle, each loadable on its own.

    One pickler serves a replica's messages (setting one up costs more than pickling a
    small call); its memo is cleared between calls so no pickle refers to another. A
    call of plain values (:func:`_plain`) goes through the C pickler instead: cloudpickle
    would write the same bytes, more slowly (its hook runs for every object).
    """

    def __init__(self) -> None:
        self._buffer = io.BytesIO()
        self._pickler = self._new_pickler()

    def _new_pickler(self) -> Any:
        return cloudpickle.CloudPickler(self._buffer, protocol=pickle.HIGHEST_PROTOCOL)

    def dumps(self, call: Call) -> bytes:
        if _plain(call):
            return pickle.dumps(call, pickle.HIGHEST_PROTOCOL)
        self._buffer.seek(0)
        self._buffer.truncate()
        self._pickler.clear_memo()
        try:
            self._pickler.dump(call)
        except BaseException:
            self._pickler = self._new_pickler()  # a failed dump may leave it mid-frame
            raise
        return self._buffer.getvalue()


# ray.get without the wrapper that starts a new Ray when none is running: a reply of a Ray
# that someone shut down must fail, not start another Ray.
_ray_get = getattr(ray.get, "__wrapped__", ray.get)


def _wait_for(ref: Any) -> Any:
    """``ray.get(ref)``, or ``ReplicaDiedError`` if Ray is shut down before or meanwhile."""
    while ray.is_initialized():
        try:
            return _ray_get(ref, timeout=RAY_CHECK_INTERVAL_S)
        except ray_errors.GetTimeoutError:
            continue
        except SystemExit:  # what a waiting ray.get raises when another thread shuts Ray down
            break
        except ray_errors.RaySystemError:  # e.g. "Ray has not been started"
            if ray.is_initialized():
                raise
    raise ReplicaDiedError("Ray was shut down while the call was running")


def _failed(call: Call, what: str, exc: BaseException) -> list[Outcome]:
    """Every query of ``call`` fails with a ``ServeError`` explaining ``what`` happened."""
    error = ServeError(f"{what}: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return [Outcome(False, error)] * len(call)

"""The Ray executor: each replica is a Ray actor hosting an :class:`~serve_core.invoke.Invoker`.

The only module of serve_core that imports Ray (it is loaded by name, on first use,
through ``EXECUTORS`` in :mod:`serve_core.executors.base`). Install with
``pip install serve-core[ray]``.

* Which Ray: the one already initialised in this process; else a local Ray of its own,
  unless ``ray_init_kwargs`` gives an ``address`` or ``RAY_ADDRESS`` names a cluster to
  join (see :func:`ray_init_arguments`): never one that someone merely started on the
  machine.
* Placement: the backend's ``num_cpus``, ``num_gpus``, ``memory`` and ``resources``
  become the actor's options, so Ray puts each replica where those resources are.
* Calls: a replica holds up to 32 calls by default (see
  :data:`DEFAULT_MAX_CONCURRENT_QUERIES`) and keeps two actor calls in flight; calls
  submitted while both are out leave together, as one actor call, when one returns.
  The actor runs them one by one, in order. Each call, and each call's outcomes, is
  pickled on its own, so one that cannot cross fails alone. One reader thread per
  replica waits for the replies, oldest first: no thread waits per request.
* Web requests travel as they are: the HTTP front's ``ServeRequest`` pickles itself to a
  self-contained copy (see :mod:`serve_core.http.request`).
* Faults: a dead actor fails the calls sent to it with :class:`~serve_core.errors.ReplicaDiedError`
  (the router then replaces the replica); calls still in the outbox never left and fail
  with :class:`~serve_core.errors.NotDeliveredError`, which puts them back in the queue.
  A result or exception that cannot cross the process boundary fails that call's
  queries with :class:`~serve_core.errors.ServeError` and leaves the replica running.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import threading
import uuid
from collections import deque
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any

import ray
from ray import cloudpickle  # Ray's own copy: classes sent by value keep their identity
from ray import exceptions as ray_errors

from ..config import BackendConfig
from ..errors import (
    NotDeliveredError,
    ReplicaDiedError,
    ServeError,
    ServeStateError,
    ServeTypeError,
    ValidationError,
)
from ..invoke import Invoker
from ._outcomes import dump_outcomes
from .base import Call, Outcome, ReplicaSpec

log = logging.getLogger("serve_core")

DEFAULT_RAY_INIT_KWARGS: dict[str, Any] = {"include_dashboard": False}
"""``ray.init`` arguments used when Ray is not running and none were given.

Ray sizes the local node from the machine (``num_cpus=None``); the dashboard is off
because an embedded library should not start a web UI nobody asked for. Which Ray
they start or join: see :func:`ray_init_arguments`.
"""

RAY_ADDRESS_VARIABLE = "RAY_ADDRESS"
"""The environment variable through which Ray's tools point a driver at a cluster."""

DEFAULT_START_TIMEOUT_S = 300.0
"""How long ``start_replica`` waits for Ray to place and construct an actor."""


class ReplicaActor:
    """The object living inside each Ray actor: builds the backend once, runs calls."""

    def __init__(self, target: Any, init_args: tuple[Any, ...]) -> None:
        self._invoker: Invoker | None = None
        self._error: Exception | None = None
        try:
            self._invoker = Invoker(target, init_args)
        except Exception as exc:  # noqa: BLE001 - reported to the parent by ready()
            self._error = exc

    def ready(self) -> tuple[str, Exception | None]:
        """The node this actor runs on, and the constructor's error if it failed."""
        return ray.get_runtime_context().get_node_id(), self._error

    def run(self, calls: list[bytes]) -> list[bytes | str]:
        """Run pickled calls one by one, in order; one answer each (see :meth:`run_one`)."""
        return [self.run_one(data) for data in calls]

    def run_one(self, data: bytes) -> bytes | str:
        """Run one pickled call.

        Returns the call's pickled outcomes (user errors are outcomes), or, for a call
        that cannot be unpickled here, why not: one bad call never costs the calls
        travelling with it.
        """
        if self._invoker is None:
            raise ServeError("replica was not constructed")
        try:
            call: Call = pickle.loads(data)
        except Exception as exc:  # noqa: BLE001 - e.g. a class this process cannot import
            return f"{type(exc).__name__}: {exc}"
        return dump_outcomes(self._invoker.run(call), cloudpickle.dumps)


_RemoteReplicaActor = ray.remote(ReplicaActor)


def actor_options(config: BackendConfig) -> dict[str, Any]:
    """Ray actor options from a backend config; unset (``None``) fields are left out.

    ``object_store_memory`` is not passed: Ray deprecated it for actors because it
    reserves nothing.
    """
    options: dict[str, Any] = {}
    if config.num_cpus is not None:
        options["num_cpus"] = config.num_cpus
    if config.num_gpus is not None:
        options["num_gpus"] = config.num_gpus
    if config.memory is not None:
        options["memory"] = int(config.memory)
    if config.resources is not None:
        options["resources"] = dict(config.resources)
    return options


Pending = tuple[Call, "Future[list[Outcome]]"]
Sent = tuple[Any, list[Pending]]  # an actor call's ObjectRef and the calls it carries

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
sent, and how many calls an actor's death fails. ``max_concurrent_queries=1`` gives
the original's strict rule.
"""


STOP_JOIN_TIMEOUT_S = 30.0
"""How long ``stop`` waits for a replica's reply reader once the actor is killed."""

RAY_CHECK_INTERVAL_S = 1.0
"""How often a reader waiting for a reply checks that Ray is still running.

A ``ray.get`` under way when someone else calls ``ray.shutdown()`` would wait forever.
"""


class RayReplica:
    """One backend replica in a Ray actor.

    Calls submitted together travel together: see :data:`MESSAGES_IN_FLIGHT`. Calls
    leave in the order submitted (one send lock orders them), and the actor runs the
    calls of a message one by one, exactly as it would run separate actor calls.

    Replies are read by one thread per replica, which blocks in ``ray.get`` on the
    oldest message in flight (an actor answers in order): a blocking ``ray.get`` wakes
    sooner than Ray's completion callbacks (about 0.1x of a bare call, measured with
    ``bench/bench_ray.py``), and one thread per replica, not per request, bounds the cost.
    """

    default_max_concurrent_queries = DEFAULT_MAX_CONCURRENT_QUERIES

    def __init__(self, replica_id: str, actor: Any, node_id: str, on_stop: Any) -> None:
        self.replica_id = replica_id
        self.node_id = node_id
        self._actor = actor
        self._on_stop = on_stop
        self._lock = threading.Lock()  # the state below; never held while calling Ray
        self._replied = threading.Condition(self._lock)  # a message was sent, or one ended
        # Held from taking calls out of the outbox until their message is listed in _sent, so
        # messages leave, and are read, in the order submitted. Re-entrant: a message that
        # fails to leave ends at once, and its end sends what waits.
        self._send_lock = threading.RLock()
        self._messages = 0  # actor calls out, counted from before they are sent
        self.actor_calls = 0  # actor calls made so far (for diagnostics and tests)
        self._outbox: list[Pending] = []
        self._sent: deque[Sent] = deque()  # oldest first, as the actor answers them
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
        """Send what waits in the outbox as one actor call, unless enough are out already."""
        with self._send_lock:
            with self._lock:
                if not self._outbox or self._messages >= MESSAGES_IN_FLIGHT or self._dead:
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
        pickler = _CallPickler()
        for call, future in message:
            try:
                blobs.append(pickler.dumps(call))
            except Exception as exc:  # noqa: BLE001 - e.g. arguments that cannot be pickled
                self._resolve(future, _failed(call, f"the call could not be sent to replica {self.replica_id}", exc))
            else:
                sendable.append((call, future))
        if not sendable:
            self._finish([], [])
            return
        try:
            # A lone call travels bare: Ray carries one bytes argument faster than a list.
            ref = self._actor.run_one.remote(blobs[0]) if len(blobs) == 1 else self._actor.run.remote(blobs)
        except Exception as exc:  # noqa: BLE001 - Ray refused the call (e.g. it was shut down)
            died = NotDeliveredError(f"replica {self.replica_id} could not be reached: {exc}")
            died.__cause__ = exc
            self._finish(sendable, died)
            return
        with self._lock:
            self.actor_calls += 1
            self._sent.append((ref, sendable))
            self._replied.notify()

    def _read_replies(self) -> None:
        """The reader thread: hands each message's reply to :meth:`_finish`, oldest first.

        Ends once the replica is stopped and every message is answered (``stop`` kills
        the actor first, so a reply still awaited then arrives, as the actor's death).
        """
        while (sent := self._oldest_sent()) is not None:
            ref, message = sent
            reply: Any
            try:
                reply = _wait_for(ref)
                if len(message) == 1:  # sent to run_one
                    reply = [reply]
            except Exception as exc:  # noqa: BLE001 - the actor died, or Ray itself failed
                reply = exc
            with self._lock:
                self._sent.popleft()
            self._finish(message, reply)
        if self._stop_when_read:
            self._end()
            self._on_stop(self)

    def _oldest_sent(self) -> Sent | None:
        """The oldest message out, once there is one; None once stopped with none left."""
        with self._replied:
            while not self._sent:
                if self._stopped and not self._messages:
                    return None
                self._replied.wait()
            return self._sent[0]

    def _finish(self, message: list[Pending], reply: Any) -> None:
        """A message ended: ``reply`` has one answer per call, or is why it failed.

        What waited in the outbox leaves first, so the actor stays busy; then the
        message's calls are answered.
        """
        dead = isinstance(reply, (ray_errors.RayActorError, ReplicaDiedError))
        try:
            with self._lock:
                self._messages -= 1
                self._dead = self._dead or dead
                self._replied.notify()  # the reader may be waiting for the last message to end
            if not dead:
                self._send_outbox()
        finally:
            if dead:
                self._fail_all(message, reply)
            else:
                self._answer(message, reply)

    def _answer(self, message: list[Pending], reply: Any) -> None:
        if isinstance(reply, BaseException) or len(reply) != len(message):  # run() itself failed
            error = reply if isinstance(reply, BaseException) else ServeError(
                f"the actor answered {len(reply)} of {len(message)} calls"
            )
            for call, future in message:
                self._resolve(future, _failed(call, f"replica {self.replica_id} could not run the call", error))
            return
        for (call, future), answer in zip(message, reply):
            if isinstance(answer, str):
                outcomes = _failed(call, f"replica {self.replica_id} could not read the call", ServeError(answer))
            else:
                try:
                    outcomes = pickle.loads(answer)
                except Exception as exc:  # noqa: BLE001 - e.g. a result class this process cannot import
                    outcomes = _failed(call, f"the results of replica {self.replica_id} could not be read", exc)
            self._resolve(future, outcomes)

    def _fail_all(self, message: list[Pending], error: BaseException) -> None:
        """The actor is gone: this message's calls fail; those still in the outbox never left."""
        with self._lock:
            unsent, self._outbox = self._outbox, []
        if isinstance(error, NotDeliveredError):  # the message never left either
            message, unsent = [], message + unsent
        for _, future in message:
            died = ReplicaDiedError(f"replica {self.replica_id} (Ray actor) died during the call: {error}")
            died.__cause__ = error
            self._resolve(future, died)
        for _, future in unsent:
            self._resolve(future, NotDeliveredError(f"replica {self.replica_id} is gone: {error}"))

    def _resolve(self, future: Future[list[Outcome]], result: list[Outcome] | BaseException) -> None:
        with self._lock:
            self._in_flight.discard(future)
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    def stop(self, drain_timeout: float | None = None) -> None:
        """Let the calls out finish (up to ``drain_timeout``), then kill the actor.

        Called from a reply's callback, so on the reader thread, which alone can answer
        the calls still out, it returns at once: the reader kills the actor once they
        are answered.
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
        """Kill the actor; calls still in the outbox never left, and go back to the queue."""
        try:
            if ray.is_initialized():  # else ray.kill would start a new Ray, and the actor is gone anyway
                ray.kill(self._actor, no_restart=True)
        except Exception:  # noqa: BLE001 - Ray may already be gone; nothing left to stop
            log.debug("killing the actor of replica %s failed", self.replica_id, exc_info=True)
        self._fail_all([], ReplicaDiedError(f"replica {self.replica_id} was stopped"))


class _CallPickler:
    """Pickles calls one by one with Ray's cloudpickle, each loadable on its own.

    One pickler serves a whole message (setting one up costs more than pickling a small
    call); its memo is cleared between calls so no pickle refers to another.
    """

    def __init__(self) -> None:
        self._buffer = io.BytesIO()
        self._pickler = self._new_pickler()

    def _new_pickler(self) -> Any:
        return cloudpickle.CloudPickler(self._buffer, protocol=pickle.HIGHEST_PROTOCOL)

    def dumps(self, call: Call) -> bytes:
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


def ray_init_arguments(ray_init_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The ``ray.init`` arguments for ``ray_init_kwargs``: a Ray of our own unless told to join one.

    Given no address, ``ray.init`` joins the cluster that ``ray start`` last started on
    this machine (it records it in ``/tmp/ray/ray_current_cluster``), whoever started it
    and for whatever purpose, and then refuses ``num_cpus``. So an executor told nothing
    starts a local Ray (``address="local"``). Being told is an ``address`` in
    ``ray_init_kwargs`` (``"auto"`` asks for that discovery), or, without one, the
    ``RAY_ADDRESS`` environment variable: it is set for this process on purpose (by the
    user, or by ``ray job submit`` in a job's driver), and Ray's tools honour it, so then
    the address is left to Ray, which joins that cluster. An explicit address, including
    ``"local"``, wins over ``RAY_ADDRESS``; ``address=None`` counts as no address.

    Args:
        ray_init_kwargs: the executor's ``ray_init_kwargs``; ``None`` for
            :data:`DEFAULT_RAY_INIT_KWARGS`. Not modified.

    Returns:
        A new dict to pass to ``ray.init``.
    """
    kwargs = dict(DEFAULT_RAY_INIT_KWARGS if ray_init_kwargs is None else ray_init_kwargs)
    if kwargs.get("address") is None:
        kwargs.pop("address", None)
        if not os.environ.get(RAY_ADDRESS_VARIABLE):  # Ray ignores an empty one too
            kwargs["address"] = "local"
    return kwargs


def _init_ray(kwargs: dict[str, Any]) -> None:
    """``ray.init(**kwargs)``; Ray's refusal of a cluster that ``RAY_ADDRESS`` chose says so.

    Raises:
        ValidationError: Ray refused ``kwargs`` for the cluster named by ``RAY_ADDRESS``
            (e.g. ``num_cpus``, which only a new local Ray takes).
    """
    try:
        ray.init(**kwargs)
    except ValueError as exc:
        if "address" in kwargs:
            raise
        address = os.environ.get(RAY_ADDRESS_VARIABLE)
        reason = str(exc).rstrip(".")
        raise ValidationError(
            f"Ray refused ray_init_kwargs {kwargs} when joining the cluster at "
            f"{RAY_ADDRESS_VARIABLE}={address} ({reason}); leave those arguments out to join it, "
            f"or add 'address': 'local' to start a local Ray instead"
        ) from exc


class RayExecutor:
    """Places replicas as Ray actors, on a Ray it starts or one already running.

    Args:
        ray_init_kwargs: arguments of ``ray.init`` when Ray is not initialised yet;
            ``None`` uses :data:`DEFAULT_RAY_INIT_KWARGS`. Without an ``address`` (or
            ``RAY_ADDRESS``) the executor starts a local Ray of its own; ``address=``
            joins a cluster (see :func:`ray_init_arguments`). Ignored when Ray is
            already initialised in this process.
        start_timeout_s: how long a replica may take to be placed and constructed.
    """

    name = "ray"
    places_replicas = True  # honours BackendConfig's resource fields and ray_init_kwargs

    def __init__(
        self,
        ray_init_kwargs: dict[str, Any] | None = None,
        *,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
    ) -> None:
        self._started_ray = False
        if ray.is_initialized():
            if ray_init_kwargs:
                log.info("Ray is already initialised; ray_init_kwargs %s are not used", ray_init_kwargs)
        else:
            _init_ray(ray_init_arguments(ray_init_kwargs))
            self._started_ray = True
        self._start_timeout = start_timeout_s
        self._prefix = f"serve_core-{uuid.uuid4().hex[:12]}"
        self._lock = threading.Lock()
        self._replicas: dict[str, RayReplica] = {}
        self._closed = False

    @property
    def actor_name_prefix(self) -> str:
        """Every actor this executor creates is named ``<prefix>:<replica id>``."""
        return self._prefix

    def start_replica(self, spec: ReplicaSpec) -> RayReplica:
        """Create the actor, wait until it is placed and constructed.

        Raises:
            Exception: the backend constructor's own exception, when it failed.
            ServeTypeError: the backend or its init args cannot be sent to Ray.
            ServeError: Ray could not place the actor within ``start_timeout_s``
                (e.g. no node has the requested resources) or it died while starting.
            ServeStateError: Ray is no longer running (someone called ``ray.shutdown()``).
        """
        if not ray.is_initialized():  # shut down by someone else: do not start a new Ray
            raise ServeStateError(f"Ray is not running: cannot start a replica of backend {spec.backend_tag!r}")
        options = actor_options(spec.config)
        name = f"{self._prefix}:{spec.replica_id}"
        try:
            actor = _RemoteReplicaActor.options(name=name, max_restarts=0, **options).remote(
                spec.target, spec.init_args
            )
        except Exception as exc:  # noqa: BLE001 - cloudpickle/Ray option errors
            raise ServeTypeError(f"backend {spec.backend_tag!r} cannot be sent to Ray: {exc}") from exc
        node_id = self._wait_ready(spec, actor, options)
        replica = RayReplica(spec.replica_id, actor, node_id, self._forget)
        with self._lock:
            self._replicas[spec.replica_id] = replica
            closed = self._closed
        if closed:  # shutdown() ran while this replica was starting
            replica.stop(0)
        return replica

    def _wait_ready(self, spec: ReplicaSpec, actor: Any, options: dict[str, Any]) -> str:
        try:
            node_id, error = ray.get(actor.ready.remote(), timeout=self._start_timeout)
        except ray_errors.GetTimeoutError:
            ray.kill(actor, no_restart=True)
            raise ServeError(
                f"Ray could not start a replica of backend {spec.backend_tag!r} within "
                f"{self._start_timeout} s; it asks for {options or 'default resources'} and the "
                f"cluster has {ray.cluster_resources()}"
            ) from None
        except ray_errors.RayError as exc:
            ray.kill(actor, no_restart=True)
            raise ServeError(f"replica of backend {spec.backend_tag!r} failed to start: {exc}") from exc
        if error is not None:
            ray.kill(actor, no_restart=True)
            raise error
        return str(node_id)

    def _forget(self, replica: RayReplica) -> None:
        with self._lock:
            self._replicas.pop(replica.replica_id, None)

    def shutdown(self) -> None:
        """Kill the actors this executor created; stop Ray only if this executor started it."""
        with self._lock:
            self._closed = True
            replicas = list(self._replicas.values())
        for replica in replicas:
            replica.stop(0)
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False

"""The Ray executor: each replica is a Ray actor hosting an :class:`~serve_core.invoke.Invoker`.

Loaded by name, on first use, through ``EXECUTORS`` in :mod:`serve_core.executors.base`; it
and its ``ray_*`` sibling modules are the only ones of serve_core that import Ray. Install
with ``pip install serve-core[ray]``.

* Which Ray: the one already initialised in this process; else a local Ray of its own,
  unless ``ray_init_kwargs`` gives an ``address`` or ``RAY_ADDRESS`` names a cluster to
  join (see :func:`ray_init_arguments`): never one that someone merely started on the
  machine. A local Ray it starts gets a watchdog (:mod:`.ray_watchdog`), so none of its
  processes outlives this one, even killed by SIGKILL.
* Placement: the backend's ``num_cpus``, ``num_gpus``, ``memory`` and ``resources``
  become the actor's options, so Ray puts each replica where those resources are.
* Warm spare: once a replica that reserves no resources has started, the executor keeps
  one empty actor ready (a Ray worker that has imported serve_core); the next replica of
  that kind, a replacement above all, is built in it instead of waiting for Ray to start
  and set up a worker (seconds on a busy machine).
* Calls and faults: see :mod:`.ray_replica` (calls travel coalesced; a dead actor's
  calls that had not started go back to the queue) and :mod:`.ray_actor`.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import uuid
from typing import Any

import ray
from ray import exceptions as ray_errors

from ..config import BackendConfig
from ..errors import ServeError, ServeStateError, ServeTypeError, ValidationError
from . import ray_watchdog
from .base import ReplicaSpec
from .ray_actor import HostInfo, ReplicaActor
from .ray_async import ACTOR_MAX_CONCURRENCY, RayAsyncReplica, RemoteAsyncReplicaActor, runs_on_async_actor
from .ray_gateway import GatewayPump, LinkInfo
from .ray_replica import DEFAULT_MAX_CONCURRENT_QUERIES, MESSAGES_IN_FLIGHT, RayReplica

__all__ = [
    "DEFAULT_MAX_CONCURRENT_QUERIES",
    "DEFAULT_RAY_INIT_KWARGS",
    "MESSAGES_IN_FLIGHT",
    "RayExecutor",
    "RayReplica",
    "actor_options",
    "ray_init_arguments",
    "spare_options",
]

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

_RemoteReplicaActor: Any = ray.remote(ReplicaActor)


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


def spare_options(options: dict[str, Any]) -> dict[str, Any] | None:
    """The options of a warm spare for replicas with ``options``; None when a spare would hold resources.

    A replica that reserves nothing while it runs (Ray's default actor holds no CPU once
    placed) can be built in a spare created with ``num_cpus=0``: it is placed at once,
    wherever there is room, and never asks an autoscaler for a node. A spare for
    replicas that reserve CPUs, GPUs, memory or custom resources would keep them from
    other work, so those get none.
    """
    if options.get("resources") or any(options.get(key) for key in ("num_cpus", "num_gpus", "memory")):
        return None
    return {**options, "num_cpus": 0}


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


def _start_ray(kwargs: dict[str, Any]) -> ray_watchdog.Watchdog | None:
    """Initialise Ray; for a local Ray (its head processes are our children), start its watchdog."""
    local = kwargs.get("address") == "local" and ray_watchdog.available()
    before = ray_watchdog.children(os.getpid()) if local else {}
    _init_ray(kwargs)
    if not local:
        return None
    package = os.path.dirname(os.path.abspath(ray.__file__))
    roots = {
        pid: started for pid, started in ray_watchdog.children(os.getpid()).items()
        if pid not in before and package in _command_line(pid)
    }
    if not roots:  # nothing of Ray's runs under this process (a Ray that changed how it starts)
        return None
    try:
        return ray_watchdog.Watchdog(roots)
    except OSError:
        log.warning("could not start the watchdog of the local Ray; its agents may outlive a killed process",
                    exc_info=True)
        return None


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read().decode(errors="replace")
    except OSError:
        return ""


def _local_node_id() -> str | None:
    try:
        return str(ray.get_runtime_context().get_node_id())
    except Exception:  # noqa: BLE001 - e.g. Ray Client: no node of ours; progress is read remotely
        return None


class _SpareLost(Exception):
    """The warm spare died before a backend could be built in it."""


class RayExecutor:
    """Places replicas as Ray actors, on a Ray it starts or one already running.

    Args:
        ray_init_kwargs: arguments of ``ray.init`` when Ray is not initialised yet;
            ``None`` uses :data:`DEFAULT_RAY_INIT_KWARGS`. Without an ``address`` (or
            ``RAY_ADDRESS``) the executor starts a local Ray of its own; ``address=``
            joins a cluster (see :func:`ray_init_arguments`). Ignored when Ray is
            already initialised in this process.
        start_timeout_s: how long a replica may take to be placed and constructed.
        warm_spare: keep an empty actor ready for the next replica that reserves no
            resources (see :func:`spare_options`); it costs one idle Ray worker process.
    """

    name = "ray"
    places_replicas = True  # honours BackendConfig's resource fields and ray_init_kwargs

    def __init__(
        self,
        ray_init_kwargs: dict[str, Any] | None = None,
        *,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        warm_spare: bool = True,
    ) -> None:
        self._started_ray = False
        self._watchdog: ray_watchdog.Watchdog | None = None
        if ray.is_initialized():
            if ray_init_kwargs:
                log.info("Ray is already initialised; ray_init_kwargs %s are not used", ray_init_kwargs)
        else:
            self._watchdog = _start_ray(ray_init_arguments(ray_init_kwargs))
            self._started_ray = True
        self._start_timeout = start_timeout_s
        self._warm_spare = warm_spare
        self._local_node = _local_node_id()
        self._prefix = f"serve_core-{uuid.uuid4().hex[:12]}"
        self._lock = threading.Lock()
        self._replicas: dict[str, RayReplica | RayAsyncReplica] = {}
        self._gateways: dict[str, GatewayPump] = {}  # instance id -> its gateway (composed calls)
        self._spares: dict[str, tuple[Any, str]] = {}  # repr of spare options -> an empty actor, its name
        self._spare_ids = itertools.count(1)
        self._closed = False

    @property
    def actor_name_prefix(self) -> str:
        """Every actor this executor creates is named ``<prefix>:<replica id>`` or ``<prefix>:spare-<n>``."""
        return self._prefix

    @property
    def spares(self) -> list[str]:
        """The names of the warm spare actors kept now."""
        with self._lock:
            return [name for _, name in self._spares.values()]

    @property
    def watchdog_pid(self) -> int | None:
        """The pid of the watchdog of the local Ray this executor started (None if none)."""
        return self._watchdog.pid if self._watchdog is not None else None

    def start_replica(self, spec: ReplicaSpec) -> RayReplica | RayAsyncReplica:
        """Build the backend in the warm spare, or in a new actor; wait until it is constructed.

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
        link = self._link(spec)
        replica: RayReplica | RayAsyncReplica
        if runs_on_async_actor(spec.target):
            actor, name, host = self._place_async(spec, options, link)
            replica = RayAsyncReplica(spec.replica_id, actor, host, self._forget, name)
        else:
            actor, name, host = self._place(spec, options, link)
            replica = RayReplica(spec.replica_id, actor, host, self._local_node, self._forget, name)
        with self._lock:
            self._replicas[spec.replica_id] = replica
            closed = self._closed
        if closed:  # shutdown() ran while this replica was starting
            replica.stop(0)
        else:
            self._keep_spare(options)
        return replica

    def _link(self, spec: ReplicaSpec) -> LinkInfo | None:
        """How the replica's handles reach its instance: the instance's gateway, started on first use."""
        if spec.scope is None:
            return None
        instance_id = spec.scope.link.instance_id
        with self._lock:
            pump = self._gateways.get(instance_id)
            if pump is None:
                pump = self._gateways[instance_id] = GatewayPump(spec.scope)
        return pump.link_info(spec.backend_tag, spec.replica_id)

    def _place_async(
        self, spec: ReplicaSpec, options: dict[str, Any], link: LinkInfo | None
    ) -> tuple[Any, str, HostInfo]:
        """A new async actor for an async backend (see :mod:`.ray_async`; no warm spare for those)."""
        name = f"{self._prefix}:{spec.replica_id}"
        try:
            actor = RemoteAsyncReplicaActor.options(
                name=name, max_restarts=0, max_concurrency=ACTOR_MAX_CONCURRENCY, **options
            ).remote()
        except Exception as exc:  # noqa: BLE001 - Ray refused the options
            raise ServeTypeError(f"backend {spec.backend_tag!r} cannot be placed on Ray: {exc}") from exc
        return actor, name, self._build(spec, actor, options, spare=None, link=link)

    def _place(
        self, spec: ReplicaSpec, options: dict[str, Any], link: LinkInfo | None = None
    ) -> tuple[Any, str, HostInfo]:
        """The actor a replica runs in (the warm spare if there is one), its name, and what it reported."""
        spare, spare_name = self._take_spare(options)
        if spare is not None:
            try:
                return spare, spare_name, self._build(spec, spare, options, spare=spare_name, link=link)
            except _SpareLost:
                log.info("the warm spare actor was lost; starting a new one for %s", spec.replica_id)
        try:
            name = f"{self._prefix}:{spec.replica_id}"
            actor = _RemoteReplicaActor.options(name=name, max_restarts=0, **options).remote()
        except Exception as exc:  # noqa: BLE001 - Ray refused the options
            raise ServeTypeError(f"backend {spec.backend_tag!r} cannot be placed on Ray: {exc}") from exc
        return actor, name, self._build(spec, actor, options, spare=None, link=link)

    def _build(
        self, spec: ReplicaSpec, actor: Any, options: dict[str, Any], spare: str | None, link: LinkInfo | None = None
    ) -> HostInfo:
        """Build the backend in ``actor`` (killed if that fails; the warm spare named ``spare`` is put
        back if the backend could not even be sent)."""
        try:
            ref = actor.build.remote(spec.target, spec.init_args, link)
        except Exception as exc:  # noqa: BLE001 - cloudpickle errors
            if spare is not None:
                self._return_spare(options, actor, spare)
            else:
                ray.kill(actor, no_restart=True)
            raise ServeTypeError(f"backend {spec.backend_tag!r} cannot be sent to Ray: {exc}") from exc
        try:
            host: HostInfo = ray.get(ref, timeout=self._start_timeout)
        except ray_errors.GetTimeoutError:
            ray.kill(actor, no_restart=True)
            raise ServeError(
                f"Ray could not start a replica of backend {spec.backend_tag!r} within "
                f"{self._start_timeout} s; it asks for {options or 'default resources'} and the "
                f"cluster has {ray.cluster_resources()}"
            ) from None
        except ray_errors.RayError as exc:
            ray.kill(actor, no_restart=True)
            if spare is not None and isinstance(exc, ray_errors.RayActorError):
                raise _SpareLost() from exc
            raise ServeError(f"replica of backend {spec.backend_tag!r} failed to start: {exc}") from exc
        if host.error is not None:
            ray.kill(actor, no_restart=True)  # a failed constructor may have left anything behind
            raise host.error
        return host

    # ----------------------------------------------------------------- spares
    def _keep_spare(self, options: dict[str, Any]) -> None:
        """Start an empty actor for the next replica like this one, unless one is there."""
        spare = spare_options(options) if self._warm_spare else None
        if spare is None:
            return
        key = repr(sorted(spare.items()))
        with self._lock:
            if self._closed or key in self._spares:
                return
            name = f"{self._prefix}:spare-{next(self._spare_ids)}"
        try:
            actor = _RemoteReplicaActor.options(name=name, max_restarts=0, **spare).remote()
            # The first call to an actor waits for its address and a connection to it (about
            # a second on a busy machine): made now, it is out of the way of the build.
            actor.__ray_ready__.remote()
        except Exception:  # noqa: BLE001 - no spare then; replicas start the slow way
            log.warning("could not start a warm spare actor with %s", spare, exc_info=True)
            return
        with self._lock:
            keep = not self._closed and key not in self._spares
            if keep:
                self._spares[key] = (actor, name)
        if not keep:
            ray.kill(actor, no_restart=True)

    def _take_spare(self, options: dict[str, Any]) -> tuple[Any, str]:
        spare = spare_options(options) if self._warm_spare else None
        if spare is None:
            return None, ""
        with self._lock:
            return self._spares.pop(repr(sorted(spare.items())), (None, ""))

    def _return_spare(self, options: dict[str, Any], actor: Any, name: str) -> None:
        key = repr(sorted((spare_options(options) or {}).items()))
        with self._lock:
            keep = not self._closed and key not in self._spares
            if keep:
                self._spares[key] = (actor, name)
        if not keep:
            ray.kill(actor, no_restart=True)

    # --------------------------------------------------------------- lifecycle
    def _forget(self, replica: RayReplica | RayAsyncReplica) -> None:
        with self._lock:
            self._replicas.pop(replica.replica_id, None)
            pumps = list(self._gateways.values())
        for pump in pumps:
            pump.forget(replica.replica_id)

    def shutdown(self) -> None:
        """Kill the actors this executor created; stop Ray (and its watchdog) only if it started it."""
        with self._lock:
            self._closed = True
            replicas = list(self._replicas.values())
            spares, self._spares = [actor for actor, _ in self._spares.values()], {}
        for replica in replicas:
            replica.stop(0)
        with self._lock:
            pumps, self._gateways = list(self._gateways.values()), {}
        for pump in pumps:
            pump.stop()
        if ray.is_initialized():
            for spare in spares:
                ray.kill(spare, no_restart=True)
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None

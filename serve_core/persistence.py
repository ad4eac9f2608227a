"""The registry in a KV store: the one source of truth that every instance on the store converges on.

Keys of the registry namespace (values are JSON)::

    meta/revision     n: bumped by every registry change, in the same transaction
    endpoint/<name>   {"route": "/x" | null, "methods": ["GET", ...]}
    backend/<tag>     {"target": <code record>, "init_args": <code record>, "code_id": hex,
                       "accepts_batch": bool, "sig": <hmac>}
    config/<tag>      BackendConfig.to_dict()
    traffic/<name>    {"<backend tag>": weight, ...}
    instance/<id>     {"host", "pid", "http", "executor", "started", "last_seen", "revision", "backends"}
    deployed/traffic/<name>, deployed/config/<tag>
                      what a deployment file last set (Serve.keep_store_state): a stored value
                      that differs from it was changed at runtime since

Every registry change is validated against a :class:`Snapshot` of the store, then committed
with :meth:`RegistryStore.commit`, a compare-and-set on ``meta/revision``: if another writer
committed in between, nothing is written and the change is validated again against the new
state. ``instance/`` records are heartbeats; they do not move the revision. Code records are
described in :mod:`serve_core.codestore`. This module talks to the store only through the
:class:`~serve_core.kv.base.AtomicKVStore` contract; the store itself is opened by
:func:`serve_core.kv.open_store` (imported lazily, so the core never imports SQLAlchemy).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from .codestore import CodeStore, Signer
from .config import BackendConfig
from .errors import StoreError
from .fingerprint import code_id, shape_id
from .invoke import accepts_batch
from .kv.base import AtomicKVStore, decode_value, encode_value
from .registry import BackendInfo, BackendSpec, EndpointInfo, Registry, normalise_methods

log = logging.getLogger("serve_core")

REVISION = "meta/revision"
ENDPOINT, BACKEND, CONFIG, TRAFFIC, INSTANCE = "endpoint/", "backend/", "config/", "traffic/", "instance/"
DEPLOYED = "deployed/"
_GROUPS = (ENDPOINT, BACKEND, CONFIG, TRAFFIC, DEPLOYED)  # what a Snapshot holds (not the heartbeats)
_SIGNED = (ENDPOINT, CONFIG, TRAFFIC, DEPLOYED)  # wrapped and signed; backend records carry their own seal


@dataclasses.dataclass
class RestoreReport:
    """What the first convergence brought back from the store (``Serve.restored``).

    Attributes:
        endpoints, backends, traffic: names restored (traffic: endpoints whose
            policy was restored, possibly degraded).
        failed: store key → why it was not restored (e.g. ``"backend/x"``).
        degraded: endpoint → note, for traffic restored without some of its backends
            (their weight is spread over the others in memory; the store keeps the original).
        deferred: backends whose module was still being imported (the module that calls
            ``init``): they start when it has finished, or when it creates them itself.
    """

    endpoints: list[str] = dataclasses.field(default_factory=list)
    backends: list[str] = dataclasses.field(default_factory=list)
    traffic: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    degraded: dict[str, str] = dataclasses.field(default_factory=dict)
    deferred: list[str] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.endpoints or self.backends or self.traffic or self.failed or self.deferred)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The store's registry at one revision (one consistent read), signatures checked.

    ``records`` holds the verified values (backend records keep their own seal, checked when
    their code is loaded); ``refused`` names the records whose signature did not verify.
    A snapshot that :meth:`RegistryStore.commit` moved on (:meth:`advanced`) also knows the
    store keys written since the revision before (``base``, ``changed``), so that the next
    registry and convergence do only the work of that change.

    The records and the registry of a snapshot are shared with the snapshot it advances to
    (updated in place: a change costs the size of the change, not of the registry). A
    snapshot is read until the next commit through the same store; the registry may be
    read from any thread (its dicts only gain or replace entries, one C-level step each).
    """

    revision: int
    records: dict[str, dict[str, Any]]  # group prefix -> {name: value}
    refused: dict[str, str] = dataclasses.field(default_factory=dict)  # store key -> why
    base: int | None = None  # the revision ``changed`` is counted from (None: unknown)
    changed: frozenset[str] = frozenset()  # store keys written since ``base``
    _built: list[tuple[Registry, dict[str, str]]] = dataclasses.field(default_factory=list, compare=False, repr=False)

    def group(self, prefix: str) -> dict[str, Any]:
        return self.records.get(prefix, {})

    def deployed(self, kind_prefix: str, name: str) -> Any:
        """What a deployment file last set for ``TRAFFIC``/``CONFIG`` ``name`` (``None``: never)."""
        return self.group(DEPLOYED).get(kind_prefix + name)

    def changed_since(self, revision: int) -> frozenset[str] | None:
        """The store keys written between ``revision`` and this snapshot (``None``: not known here)."""
        if revision == self.revision:
            return frozenset()
        return self.changed if revision == self.base else None

    def registry(self, where: str) -> tuple[Registry, dict[str, str]]:
        """The registry these records describe, and store key → why a record was left out (built once)."""
        if not self._built:
            registry = Registry(where)
            problems: dict[str, str] = dict(self.refused)
            for name in self.group(ENDPOINT):
                self._parse_endpoint(registry, problems, name)
            for tag in self.group(BACKEND):
                self._parse_backend(registry, problems, tag)
            for name in self.group(TRAFFIC):
                self._parse_traffic(registry, problems, name)
            self._built.append((registry, problems))
        return self._built[0]

    def advanced(self, revision: int, values: dict[str, Any]) -> Snapshot | None:
        """This snapshot after a commit wrote ``values`` (verified, as a read returns them) as ``revision``.

        Returns ``None`` when a written record does not parse (the caller then reads the store again).
        """
        for key, value in values.items():
            prefix, _, name = key.partition("/")
            self.records[prefix + "/"][name] = value
            self.refused.pop(key, None)
        if self._built:
            registry, problems = self._built[0]
            for key in values:
                prefix, _, name = key.partition("/")
                group = prefix + "/"
                if group == ENDPOINT:
                    self._parse_endpoint(registry, problems, name)
                elif group in (BACKEND, CONFIG) and name in self.group(BACKEND):
                    self._parse_backend(registry, problems, name)
                    key = BACKEND + name
                elif group == TRAFFIC:
                    self._parse_traffic(registry, problems, name)
                if key in problems:
                    return None
        return Snapshot(revision, self.records, self.refused, self.revision, frozenset(values), self._built)

    def _parse_endpoint(self, registry: Registry, problems: dict[str, str], name: str) -> None:
        value = self.group(ENDPOINT)[name]
        _parse(problems, ENDPOINT + name, partial(_add_endpoint, registry, name, value))

    def _parse_backend(self, registry: Registry, problems: dict[str, str], tag: str) -> None:
        if CONFIG + tag in self.refused:
            problems[BACKEND + tag] = f"its config was refused: {self.refused[CONFIG + tag]}"
            return
        value, config = self.group(BACKEND)[tag], self.group(CONFIG).get(tag)
        _parse(problems, BACKEND + tag, partial(_add_backend, registry, tag, value, config))

    def _parse_traffic(self, registry: Registry, problems: dict[str, str], name: str) -> None:
        weights = self.group(TRAFFIC)[name]
        _parse(problems, TRAFFIC + name, partial(_set_traffic, registry, name, weights))


def _parse(problems: dict[str, str], key: str, action: Callable[[], None]) -> None:
    problems.pop(key, None)
    try:
        action()
    except (StoreError, TypeError, ValueError, KeyError, AttributeError) as exc:
        problems[key] = f"{type(exc).__name__}: {exc}"


def _add_endpoint(registry: Registry, name: str, value: Any) -> None:
    registry.add_endpoint(EndpointInfo(name, value["route"], normalise_methods(value["methods"])))


def _add_backend(registry: Registry, tag: str, value: Any, config: Any) -> None:
    registry.add_backend(_spec(tag, value), _config(tag, config))


def _set_traffic(registry: Registry, name: str, weights: Any) -> None:
    registry.set_traffic(name, {str(tag): float(weight) for tag, weight in dict(weights).items()})


def _spec(tag: str, value: Any) -> BackendSpec:
    if not isinstance(value, dict):
        raise StoreError(f"backend {tag!r}: the stored record is not an object")
    code, shape, batch = value.get("code_id"), value.get("shape_id"), value.get("accepts_batch")
    return BackendSpec(
        tag,
        code if isinstance(code, str) else None,
        batch if isinstance(batch, bool) else None,
        shape if isinstance(shape, str) else None,
    )


def _config(tag: str, value: Any) -> BackendConfig:
    if not isinstance(value, dict):
        raise StoreError(f"no stored config for backend {tag!r}")
    return BackendConfig.from_dict(value)


class RegistryStore:
    """Reads and commits the registry in a store.

    Args:
        store: a KV store bound to the registry namespace.
        secret: HMAC key for pickled code, or ``None`` (then only importable code is stored).
        description: the store as shown in logs and errors (no password).
        durable: ``False`` for the implicit memory store (code is not serialised).
    """

    def __init__(self, store: AtomicKVStore, secret: bytes | None, description: str, durable: bool) -> None:
        self.store = store
        self.description = description
        self.code = CodeStore(Signer(secret), durable, description)
        self._last: Snapshot | None = None  # the newest snapshot read or committed here
        self._lock = threading.Lock()  # guards _last

    # ------------------------------------------------------------ reading
    def load(self) -> Snapshot:
        """The registry at the store's current revision.

        One key is read when the revision is the one last read or committed here (every
        registry change moves it, in the same transaction); otherwise the whole registry.

        Raises:
            StoreError: the store cannot be read.
        """
        revision = self.revision()
        with self._lock:
            last = self._last
        if last is not None and last.revision == revision:
            return last
        snapshot = self._read()
        with self._lock:
            if self._last is None or self._last.revision < snapshot.revision:  # never back (a read racing a commit)
                self._last = snapshot
        return snapshot

    def latest(self) -> Snapshot:
        """The snapshot last read or committed here, without reading the store (else :meth:`load`).

        Right after a :meth:`commit` it is the revision just written: what the committing
        instance converges on (a later change by another writer comes with the next load).
        """
        with self._lock:
            last = self._last
        return last if last is not None else self.load()

    def _read(self) -> Snapshot:
        """The whole registry, in one read."""
        records: dict[str, dict[str, Any]] = {prefix: {} for prefix in _GROUPS}
        refused: dict[str, str] = {}
        revision = 0
        for key, value in sorted(self.store.as_dict().items()):
            if key == REVISION:
                revision = value if isinstance(value, int) else 0
                continue
            prefix, _, name = key.partition("/")
            group = prefix + "/"
            if group not in records:
                continue
            if group in _SIGNED:
                try:
                    value = self.code.open_value(key, value)
                except StoreError as exc:
                    refused[key] = f"StoreError: {exc}"
                    continue
            records[group][name] = value
        return Snapshot(revision, records, refused)

    def seal(self, items: dict[str, Any]) -> dict[str, Any]:
        """Registry items as written: the records that decide what runs, or how, signed."""
        return {
            key: self.code.seal_value(key, value) if key.partition("/")[0] + "/" in _SIGNED else value
            for key, value in items.items()
        }

    def revision(self) -> int:
        """The current registry revision (a cheap read: one key)."""
        value = self.store.get(REVISION)
        return value if isinstance(value, int) else 0

    # ------------------------------------------------------------ writing
    def commit(self, revision: int, items: dict[str, Any]) -> bool:
        """Write ``items`` as revision ``revision + 1`` if the store is still at ``revision``.

        Returns:
            ``False`` when another writer committed first (nothing was written).

        Raises:
            StoreError: the store cannot be written.
        """
        expected = revision or None  # revision 0: the key is not there yet
        sealed = self.seal(items)
        with self._lock:
            last, self._last = self._last, None  # unknown until the outcome is
        if not self.store.compare_and_update(REVISION, expected, {**sealed, REVISION: revision + 1}):
            return False
        if last is not None and last.revision == revision:
            with self._lock:
                self._last = last.advanced(revision + 1, self._as_read(sealed))
        return True

    def _as_read(self, sealed: dict[str, Any]) -> dict[str, Any]:
        """Written registry records as :meth:`load` returns them: fresh JSON copies, signatures opened."""
        values: dict[str, Any] = {}
        for key, value in sealed.items():
            group = key.partition("/")[0] + "/"
            if group in _GROUPS:
                copy = decode_value(encode_value(key, value))
                values[key] = self.code.open_value(key, copy) if group in _SIGNED else copy
        return values

    def encode_backend(self, info: BackendInfo, config: BackendConfig) -> dict[str, Any]:
        """The keys to write for a backend (pure: call before starting replicas).

        Raises:
            StoreError: the code cannot be stored (not importable and no signing key).
        """
        code = self.code.seal(info.tag, {
            "target": self.code.encode_target(info.tag, info.target),
            "init_args": self.code.encode_args(info.tag, info.init_args),
            "code_id": info.code_id,
            "shape_id": info.shape_id,
            "accepts_batch": info.accepts_batch,
        })
        return {BACKEND + info.tag: code, CONFIG + info.tag: config.to_dict()}

    def decode_backend(self, tag: str, record: Any, spec: BackendSpec) -> BackendInfo:
        """The definition a stored backend record holds (code imported or unpickled).

        Raises:
            StoreError: the record does not verify, the code cannot be loaded, or code stored by
                import path has changed since it was stored.
        """
        body = self.code.check(tag, record)
        target = self.code.decode_target(tag, body["target"])
        init_args = self.code.decode_args(tag, body["init_args"])
        # Code stored by import path is whatever the module holds now: refused if it was edited
        # since (its shape differs), not for state the module keeps (a cache, a counter).
        by_import = body["target"].get("kind") == "import"
        shape = shape_id(target, init_args)
        if by_import and spec.shape_id is not None and shape != spec.shape_id:
            raise StoreError(
                f"backend {tag!r}: the code at {body['target'].get('ref')!r} has changed since it was stored "
                f"in {self.description}; create the new code under a new tag, or replace it with "
                "create_backend(..., replace=True)"
            )
        batch = accepts_batch(target) if spec.accepts_batch is None else spec.accepts_batch
        return BackendInfo(tag, target, init_args, batch, spec.code_id or code_id(target, init_args), shape)

    def instance_records(self) -> dict[str, Any]:
        """Every ``instance/<id>`` record, by id (heartbeats: a read of the whole namespace)."""
        return {
            key[len(INSTANCE):]: value for key, value in self.store.as_dict().items() if key.startswith(INSTANCE)
        }

    def save_instance(self, instance_id: str, record: dict[str, Any]) -> None:
        """Write a heartbeat (not a registry change: the revision stays)."""
        self.store.update({INSTANCE + instance_id: record})

    def drop_instances(self, instance_ids: Iterable[str]) -> None:
        keys = [INSTANCE + instance_id for instance_id in instance_ids]
        if keys:
            self.store.update({}, delete=keys)

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None] | None:
        """Be told of commits as they happen, where the store can (see :class:`~serve_core.kv.base.ChangeFeed`)."""
        subscribe = getattr(self.store, "subscribe", None)
        return subscribe(callback) if callable(subscribe) else None

    def close(self) -> None:
        self.store.close()


def endpoint_items(info: EndpointInfo) -> dict[str, Any]:
    return {ENDPOINT + info.name: {"route": info.route, "methods": list(info.methods)}}


def config_items(tag: str, config: BackendConfig, deployed: bool = False) -> dict[str, Any]:
    """The keys of a config change (``deployed``: made by a deployment file, marked as such)."""
    items: dict[str, Any] = {CONFIG + tag: config.to_dict()}
    if deployed:
        items[DEPLOYED + CONFIG + tag] = config.to_dict()
    return items


def traffic_items(endpoint: str, weights: dict[str, float], deployed: bool = False) -> dict[str, Any]:
    """The keys of a traffic change (``deployed``: made by a deployment file, marked as such)."""
    items: dict[str, Any] = {TRAFFIC + endpoint: dict(weights)}
    if deployed:
        items[DEPLOYED + TRAFFIC + endpoint] = dict(weights)
    return items


ALLOW_UNSIGNED_ENV = "SERVE_CORE_ALLOW_UNSIGNED"
"""Set to ``1`` to accept a store without a signing key (as ``allow_unsigned_store=True``)."""


def open_registry_store(
    kv_store_path: Any, kv_store_connector: Callable[[str], Any] | None, allow_unsigned: bool = False
) -> RegistryStore:
    """Open the store ``init`` asked for (see :func:`serve_core.kv.open_store`).

    A store without a signing key (PostgreSQL or a connector's store without
    ``SERVE_CORE_SECRET``) is refused unless ``allow_unsigned`` (or ``SERVE_CORE_ALLOW_UNSIGNED=1``):
    whoever can write it could otherwise choose the code, configs and traffic every instance runs.

    Raises:
        StoreError: the store cannot be opened, or has no key and unsigned records were not allowed.
    """
    from .kv import open_store  # lazy: the kv package may pull in SQLAlchemy

    opened = open_store(kv_store_path, kv_store_connector)
    if opened.secret is None:
        if not (allow_unsigned or os.environ.get(ALLOW_UNSIGNED_ENV) == "1"):
            opened.store.close()
            raise StoreError(
                f"store {opened.description} has no key to sign its records: set SERVE_CORE_SECRET (at least 16 "
                "characters, the same for every process on the store), or accept unsigned records with "
                f"allow_unsigned_store=True or {ALLOW_UNSIGNED_ENV}=1 (then whoever can write the store decides "
                "what runs)"
            )
        log.warning(
            "serve_core: store %s has no signing key and unsigned records are allowed: whoever can write it "
            "decides which code, configs and traffic run here (set SERVE_CORE_SECRET to sign them)",
            opened.description,
        )
    return RegistryStore(opened.store, opened.secret, opened.description, opened.durable)

"""The registry in a KV store: what ``Serve`` writes on every change and restores on start.

Keys of the registry namespace (values are JSON)::

    endpoint/<name>   {"route": "/x" | null, "methods": ["GET", ...]}
    backend/<tag>     {"target": <code record>, "init_args": <code record>, "sig": <hmac>}
    config/<tag>      BackendConfig.to_dict()
    traffic/<name>    {"<backend tag>": weight, ...}

Code records are described in :mod:`serve_core.codestore`. A new backend writes its
``backend/`` and ``config/`` keys in one atomic update. This module talks to the store
only through the :class:`~serve_core.kv.base.KVStore` contract; the store itself is
opened by :func:`serve_core.kv.open_store` (imported lazily, so the core never imports
SQLAlchemy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

from .codestore import CodeStore, Signer
from .config import BackendConfig
from .errors import StoreError
from .kv.base import KVStore
from .registry import BackendInfo, EndpointInfo

if TYPE_CHECKING:
    from .serve import Serve

log = logging.getLogger("serve_core")

ENDPOINT, BACKEND, CONFIG, TRAFFIC = "endpoint/", "backend/", "config/", "traffic/"


@dataclasses.dataclass
class RestoreReport:
    """What :func:`restore` brought back from the store (``Serve.restored``).

    Attributes:
        endpoints, backends, traffic: names restored (traffic: endpoints whose
            policy was restored, possibly degraded).
        failed: store key → why it was not restored (e.g. ``"backend/x"``).
        degraded: endpoint → note, for traffic restored without some of its backends
            (their weight is spread over the others in memory; the store keeps the original).
    """

    endpoints: list[str] = dataclasses.field(default_factory=list)
    backends: list[str] = dataclasses.field(default_factory=list)
    traffic: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    degraded: dict[str, str] = dataclasses.field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.endpoints or self.backends or self.traffic or self.failed)


class RegistryStore:
    """Writes registry changes to a store and reads them back.

    Args:
        store: a KV store bound to the registry namespace.
        secret: HMAC key for pickled code, or ``None`` (then only importable code is stored).
        description: the store as shown in logs and errors (no password).
        durable: ``False`` for the implicit memory store (code is not serialised).
    """

    def __init__(self, store: KVStore, secret: bytes | None, description: str, durable: bool) -> None:
        self.store = store
        self.description = description
        self.code = CodeStore(Signer(secret), durable, description)
        self._paused = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Writes are skipped inside (used while restoring what the store already holds)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def save_endpoint(self, info: EndpointInfo) -> None:
        self._write({ENDPOINT + info.name: {"route": info.route, "methods": list(info.methods)}})

    def encode_backend(self, info: BackendInfo, config: BackendConfig) -> dict[str, Any]:
        """The keys to write for a new backend (pure: call before starting replicas).

        Raises:
            StoreError: the code cannot be stored (not importable and no signing key).
        """
        if self._paused:
            return {}
        code = self.code.seal(info.tag, {
            "target": self.code.encode_target(info.tag, info.target),
            "init_args": self.code.encode_args(info.tag, info.init_args),
        })
        return {BACKEND + info.tag: code, CONFIG + info.tag: config.to_dict()}

    def save_backend(self, items: dict[str, Any]) -> None:
        self._write(items)

    def save_config(self, tag: str, config: BackendConfig) -> None:
        self._write({CONFIG + tag: config.to_dict()})

    def save_traffic(self, endpoint: str, weights: dict[str, float]) -> None:
        self._write({TRAFFIC + endpoint: dict(weights)})

    def _write(self, items: dict[str, Any]) -> None:
        if not self._paused and items:
            self.store.update(items)

    def close(self) -> None:
        self.store.close()

    def load(self) -> dict[str, dict[str, Any]]:
        """The stored registry grouped by kind: ``{"endpoint/": {name: value}, ...}``."""
        groups: dict[str, dict[str, Any]] = {ENDPOINT: {}, BACKEND: {}, CONFIG: {}, TRAFFIC: {}}
        for key, value in sorted(self.store.as_dict().items()):
            prefix, _, name = key.partition("/")
            if prefix + "/" in groups:
                groups[prefix + "/"][name] = value
        return groups


def open_registry_store(kv_store_path: Any, kv_store_connector: Callable[[str], Any] | None) -> RegistryStore:
    """Open the store ``init`` asked for (see :func:`serve_core.kv.open_store`)."""
    from .kv import open_store  # lazy: the kv package may pull in SQLAlchemy

    opened = open_store(kv_store_path, kv_store_connector)
    return RegistryStore(opened.store, opened.secret, opened.description, opened.durable)


def restore(serve: Serve, registry_store: RegistryStore) -> RestoreReport:
    """Bring back the stored registry into ``serve``: endpoints, backends (replicas started),
    configs, traffic. Items that fail are logged and skipped; the rest comes back.

    Raises:
        StoreError: the store cannot be read at all.
    """
    stored = registry_store.load()
    report = RestoreReport()
    code = registry_store.code
    with registry_store.paused():
        for name, value in stored[ENDPOINT].items():
            if _attempt(report, ENDPOINT + name, partial(_endpoint, serve, name, value)):
                report.endpoints.append(name)
        for tag, value in stored[BACKEND].items():
            config = stored[CONFIG].get(tag)
            if _attempt(report, BACKEND + tag, partial(_backend, serve, code, tag, value, config)):
                report.backends.append(tag)
        for name, weights in stored[TRAFFIC].items():
            if _attempt(report, TRAFFIC + name, partial(_traffic, serve, name, weights, report)):
                report.traffic.append(name)
    if report:
        _log_report(report, registry_store.description)
    return report


def _attempt(report: RestoreReport, key: str, action: Callable[[], None]) -> bool:
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - one bad item must not stop the others
        report.failed[key] = f"{type(exc).__name__}: {exc}"
        log.error("serve_core: could not restore %s: %s", key, report.failed[key])
        return False
    return True


def _endpoint(serve: Serve, name: str, value: Any) -> None:
    serve.create_endpoint(name, value["route"], value["methods"])


def _backend(serve: Serve, code: CodeStore, tag: str, value: Any, config: Any) -> None:
    if not isinstance(config, dict):
        raise StoreError(f"no stored config for backend {tag!r}")
    record = code.check(tag, value)
    target = code.decode_target(tag, record["target"])
    init_args = code.decode_args(tag, record["init_args"])
    serve.create_backend(target, tag, *init_args, backend_config=BackendConfig.from_dict(config))


def _traffic(serve: Serve, name: str, weights: Any, report: RestoreReport) -> None:
    live = report.backends
    kept = {tag: weight for tag, weight in dict(weights).items() if tag in live}
    missing = sorted(set(weights) - set(kept))
    if missing:
        total = sum(kept.values())
        if not kept or total <= 0:
            raise StoreError(f"none of its backends with weight were restored (missing {missing})")
        kept = {tag: weight / total for tag, weight in kept.items()}
        report.degraded[name] = f"serving without {missing}; weights renormalised to {kept}"
        log.warning("serve_core: endpoint %r %s", name, report.degraded[name])
    serve.split(name, kept)


def _log_report(report: RestoreReport, where: str) -> None:
    log.info(
        "serve_core: restored from %s: endpoints %s, backends %s, traffic %s%s",
        where,
        report.endpoints,
        report.backends,
        report.traffic,
        f"; NOT restored: {sorted(report.failed)}" if report.failed else "",
    )

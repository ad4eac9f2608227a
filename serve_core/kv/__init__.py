"""KV stores: the contract, a memory store, a SQLAlchemy store, and :func:`open_store`.

``Serve`` imports this package lazily and only through :func:`open_store`; SQLAlchemy is
imported only when a SQL store is opened.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

from .base import AtomicKVStore, ChangeFeed, KVStore
from .connector import as_store
from .memory import MemoryKVStore
from .secret import resolve_secret

REGISTRY_NAMESPACE = "registry"
"""The namespace a ``Serve`` instance keeps its registry in."""

MEMORY_STORE_NAMES = frozenset({":memory:", "sqlite://", "sqlite:///:memory:"})
"""``kv_store_path`` values that keep the registry in memory, writing no file."""

DEFAULT_CLI_STORE = "serve_core.db"
"""The SQLite file ``serve-core run`` uses in the working directory unless told otherwise."""

log = logging.getLogger("serve_core")


@dataclasses.dataclass(frozen=True)
class OpenedStore:
    """A store ready for the registry.

    Attributes:
        store: the store, bound to :data:`REGISTRY_NAMESPACE`.
        secret: the HMAC key that signs stored code, ``None`` when the store has none.
        description: what to print (URL with the password hidden, ``memory``, or the
            connector's store).
        durable: whether the store outlives the process (``False`` only for the implicit
            memory store, whose backends are then not serialised at all).
    """

    store: AtomicKVStore
    secret: bytes | None
    description: str
    durable: bool


def open_store(
    kv_store_path: str | os.PathLike[str] | None = None,
    kv_store_connector: Callable[[str], Any] | None = None,
    namespace: str = REGISTRY_NAMESPACE,
) -> OpenedStore:
    """Open the registry's store as ``init`` describes it.

    ``kv_store_connector(namespace)`` wins when given; else ``kv_store_path`` (a file
    path for SQLite, or a SQLAlchemy URL); else, or for ``":memory:"`` and ``"sqlite://"``,
    a memory store (nothing on disk).

    Raises:
        ServeTypeError: the connector returned something without ``get``, ``put`` and ``as_dict``
            (the original's interface; see :mod:`serve_core.kv.connector`).
        StoreError: the database cannot be reached or the signing key not loaded.
    """
    if kv_store_connector is not None:
        if kv_store_path is not None:
            log.warning("kv_store_connector given: ignoring kv_store_path %r", kv_store_path)
        store = as_store(kv_store_connector(namespace), namespace)
        return OpenedStore(store, resolve_secret(store), repr(store), durable=True)
    if kv_store_path is None or os.fspath(kv_store_path) in MEMORY_STORE_NAMES:
        memory = MemoryKVStore(namespace)
        return OpenedStore(memory, resolve_secret(memory), "memory", durable=False)
    from .sql import SQLKVStore  # SQLAlchemy only when a SQL store is used

    sql = SQLKVStore(os.fspath(kv_store_path), namespace)
    try:
        sql.open()
        return OpenedStore(sql, resolve_secret(sql), sql.url, durable=True)
    except BaseException:
        sql.close()
        raise


__all__ = [
    "AtomicKVStore",
    "ChangeFeed",
    "DEFAULT_CLI_STORE",
    "KVStore",
    "MEMORY_STORE_NAMES",
    "MemoryKVStore",
    "OpenedStore",
    "REGISTRY_NAMESPACE",
    "open_store",
]

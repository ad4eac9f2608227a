"""Stores returned by a ``kv_store_connector``: the full contract, or the original's three methods.

Ray Serve 0.8's connector returned a store with ``get(key, default=None)``, ``put(key,
value)`` and ``as_dict()``. :class:`ConnectorStore` turns such a store into a
:class:`~serve_core.kv.base.KVStore`, using ``delete``, ``update`` and ``close`` when the
store has them and deriving them otherwise:

* ``delete(key)`` without a ``delete`` method writes a tombstone (``None``), and
  ``as_dict()`` leaves keys whose value is ``None`` out;
* ``update(items, delete)`` without ``update`` and ``delete`` methods (both: a dict's own
  ``update`` takes one mapping) is the puts, then the deletes, one by one: not atomic (a
  store that must survive a crash mid-change needs ``update``);
* ``close()`` without a ``close`` method does nothing;
* ``compare_and_update`` without one of the store's own compares and writes under a lock of
  this adapter: atomic against writers in this process that use the same adapter, not
  against other processes (give the store its own ``compare_and_update`` to share it safely);
* ``subscribe`` is the store's own, if it has one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..errors import ServeTypeError
from .base import AtomicKVStore, check_cas, check_key, encode_value

REQUIRED = ("get", "put", "as_dict")
"""What a connector's store must have at least (the 0.8 interface)."""


class ConnectorStore:
    """A :class:`KVStore` over a store that may have only ``get``, ``put`` and ``as_dict``.

    Args:
        store: what the connector returned.
        namespace: the namespace it was asked for (used when the store names none).
    """

    def __init__(self, store: Any, namespace: str) -> None:
        self.store = store
        self.namespace = getattr(store, "namespace", namespace)
        self._cas_lock = threading.Lock()

    def get(self, key: str, default: Any = None) -> Any:
        value = self.store.get(check_key(key), default)
        return default if value is None else value

    def put(self, key: str, value: Any) -> None:
        self.store.put(check_key(key), value)

    def delete(self, key: str) -> None:
        if callable(getattr(self.store, "delete", None)):
            self.store.delete(check_key(key))
        else:
            self.store.put(check_key(key), None)  # a tombstone: as_dict() leaves it out

    def as_dict(self) -> dict[str, Any]:
        return {key: value for key, value in dict(self.store.as_dict()).items() if value is not None}

    def update(self, items: Mapping[str, Any], delete: Iterable[str] = ()) -> None:
        # The store's own update is ours only beside a delete (a dict's update takes one mapping).
        if callable(getattr(self.store, "update", None)) and callable(getattr(self.store, "delete", None)):
            self.store.update(items, delete)
            return
        for key, value in items.items():
            self.put(key, value)
        for key in delete:
            self.delete(key)

    def compare_and_update(
        self, key: str, expected: Any, items: Mapping[str, Any], delete: Iterable[str] = ()
    ) -> bool:
        check_cas(key, items)
        own = getattr(self.store, "compare_and_update", None)
        if callable(own):
            return bool(own(key, expected, items, delete))
        with self._cas_lock:
            current = self.get(key)
            if (current is None) != (expected is None) or (
                current is not None and encode_value(key, current) != encode_value(key, expected)
            ):
                return False
            self.update(items, delete)
        return True

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None] | None:
        own = getattr(self.store, "subscribe", None)
        return own(callback) if callable(own) else None

    def close(self) -> None:
        close = getattr(self.store, "close", None)
        if callable(close):
            close()

    def __repr__(self) -> str:
        return repr(self.store)


def as_store(store: Any, namespace: str) -> AtomicKVStore:
    """The connector's store as an :class:`AtomicKVStore` (adapted when it lacks methods).

    Raises:
        ServeTypeError: it lacks ``get``, ``put`` or ``as_dict``.
    """
    if isinstance(store, AtomicKVStore):
        return store
    missing = [name for name in REQUIRED if not callable(getattr(store, name, None))]
    if missing:
        raise ServeTypeError(
            "kv_store_connector(namespace) must return a store with get(key, default), put(key, value) "
            f"and as_dict() (delete, update and close are used when present); {type(store).__name__} "
            f"has no {', '.join(missing)}"
        )
    return ConnectorStore(store, namespace)

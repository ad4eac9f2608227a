"""A KV store held in a dict: the default when no store is configured (nothing on disk)."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .base import UpdateBased, check_cas, check_key, check_namespace, decode_value, encode_items, encode_value


class MemoryKVStore(UpdateBased):
    """An in-process :class:`~serve_core.kv.base.KVStore`; values are kept as JSON text.

    Args:
        namespace: the namespace this store is bound to (kept for the contract; the
            dict belongs to this object alone).

    Attributes:
        signing_key: a random key made with the store, so every ``Serve`` sharing this
            object (through a connector) can verify the code blobs the others wrote,
            while nothing outside the process can.
    """

    def __init__(self, namespace: str) -> None:
        self.namespace = check_namespace(namespace)
        self._data: dict[str, str] = {}
        self._lock = threading.Lock()
        self.signing_key = secrets.token_bytes(32)
        self._subscribers: list[Callable[[], None]] = []

    def get(self, key: str, default: Any = None) -> Any:
        text = self._data.get(check_key(key))
        return default if text is None else decode_value(text)

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            items = list(self._data.items())
        return {key: decode_value(text) for key, text in items}

    def update(self, items: Mapping[str, Any], delete: Iterable[str] = ()) -> None:
        encoded, deletes = encode_items(items, delete)
        with self._lock:
            self._data.update(encoded)
            for key in deletes:
                self._data.pop(key, None)

    def compare_and_update(
        self, key: str, expected: Any, items: Mapping[str, Any], delete: Iterable[str] = ()
    ) -> bool:
        check_cas(key, items)
        encoded, deletes = encode_items(items, delete)
        want = None if expected is None else encode_value(key, expected)
        with self._lock:
            if self._data.get(key) != want:
                return False
            self._data.update(encoded)
            for name in deletes:
                self._data.pop(name, None)
            subscribers = list(self._subscribers)
        for callback in subscribers:
            callback()
        return True

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` after every :meth:`compare_and_update` that committed (in the writer's thread)."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def close(self) -> None:
        """Nothing to release; the data stays readable."""

    def __repr__(self) -> str:
        return f"<MemoryKVStore namespace={self.namespace!r} keys={len(self._data)}>"




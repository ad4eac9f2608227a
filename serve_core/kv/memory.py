"""A KV store held in a dict: the default when no store is configured (nothing on disk)."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from .base import UpdateBased, check_key, check_namespace, decode_value, encode_items


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

    def close(self) -> None:
        """Nothing to release; the data stays readable."""

    def __repr__(self) -> str:
        return f"<MemoryKVStore namespace={self.namespace!r} keys={len(self._data)}>"




"""The KV store contract: a namespaced store of JSON values.

A store is bound to one *namespace* (the original called ``connector(namespace)`` to get
one): two stores over the same database with different namespaces never see each
other's keys. Keys are non-empty strings of at most :data:`MAX_KEY_LENGTH` characters;
values are JSON-safe (``None``, bools, numbers, strings, lists and dicts with string
keys), stored as JSON text and returned as fresh objects, so a caller never shares
state with the store. Every store validates keys and values the same way *before*
touching its storage, which is what makes :meth:`KVStore.update` all-or-nothing even
for bad input.

Implementations: :class:`~serve_core.kv.memory.MemoryKVStore` and
:class:`~serve_core.kv.sql.SQLKVStore` (SQLite, PostgreSQL). Any object with these
methods can be returned by a ``kv_store_connector``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

from ..errors import ServeTypeError, ValidationError

MAX_NAMESPACE_LENGTH = 100
MAX_KEY_LENGTH = 255


@runtime_checkable
class KVStore(Protocol):
    """A namespaced key-value store of JSON values."""

    namespace: str

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` when it is missing."""

    def put(self, key: str, value: Any) -> None:
        """Insert or replace ``key``."""

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""

    def as_dict(self) -> dict[str, Any]:
        """Every key of the namespace with its value."""

    def update(self, items: Mapping[str, Any], delete: Iterable[str] = ()) -> None:
        """Put ``items`` and delete ``delete`` in one atomic step (all or nothing)."""

    def close(self) -> None:
        """Release connections. Idempotent."""


@runtime_checkable
class AtomicKVStore(KVStore, Protocol):
    """A store that can also change keys only if one key still holds a value (compare-and-set).

    This is what lets several processes share one registry: each change is validated against
    what the store holds and commits only if no other writer got in first (see docs/kv.md).
    """

    def compare_and_update(
        self, key: str, expected: Any, items: Mapping[str, Any], delete: Iterable[str] = ()
    ) -> bool:
        """If ``key`` holds ``expected`` (``None``: missing), apply ``items`` and ``delete`` in one
        atomic step and return ``True``; otherwise change nothing and return ``False``.

        ``items`` must set ``key`` itself (it is a version counter); values are compared as
        their JSON text, so use a simple value (a number).
        """


@runtime_checkable
class ChangeFeed(Protocol):
    """A store that can tell this process when a :meth:`AtomicKVStore.compare_and_update` committed
    (in any process, for PostgreSQL with ``LISTEN/NOTIFY``; in this process, for the memory store)."""

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None] | None:
        """Call ``callback()`` (from any thread, without locks held) after each committed change to
        this namespace; returns a function that unsubscribes, or ``None`` when the store cannot."""


def check_cas(key: str, items: Mapping[str, Any]) -> str:
    """Validate the key of a :meth:`AtomicKVStore.compare_and_update`.

    Raises:
        ValidationError: ``items`` do not set ``key``.
    """
    if check_key(key) not in items:
        raise ValidationError(f"compare_and_update must write its key {key!r} itself")
    return key


def _check_name(kind: str, value: Any, max_length: int) -> str:
    if not isinstance(value, str):
        raise ServeTypeError(f"a KV {kind} must be a string, got {type(value).__name__}")
    if not value or len(value) > max_length:
        raise ValidationError(
            f"a KV {kind} must have 1 to {max_length} characters, got {len(value)}: {value[:40]!r}"
        )
    return value


def check_namespace(namespace: Any) -> str:
    """Validate a namespace name.

    Raises:
        ServeTypeError: not a string. ValidationError: empty or too long.
    """
    return _check_name("namespace", namespace, MAX_NAMESPACE_LENGTH)


def check_key(key: Any) -> str:
    """Validate a key.

    Raises:
        ServeTypeError: not a string. ValidationError: empty or too long.
    """
    return _check_name("key", key, MAX_KEY_LENGTH)


class UpdateBased:
    """``put`` and ``delete`` for stores whose one write operation is ``update``."""

    def update(self, items: Mapping[str, Any], delete: Iterable[str] = ()) -> None:
        raise NotImplementedError

    def put(self, key: str, value: Any) -> None:
        self.update({key: value})

    def delete(self, key: str) -> None:
        self.update({}, delete=[key])


def encode_value(key: str, value: Any) -> str:
    """The JSON text of ``value``.

    Raises:
        ServeTypeError: the value is not JSON-safe (NaN and infinities included).
    """
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ServeTypeError(f"the value of KV key {key!r} is not JSON-safe: {exc}") from exc


def decode_value(text: str) -> Any:
    """The value stored as ``text`` by :func:`encode_value`."""
    return json.loads(text)


def encode_items(items: Mapping[str, Any], delete: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Validate and encode an :meth:`KVStore.update` before any of it is applied."""
    encoded = {check_key(key): encode_value(key, value) for key, value in items.items()}
    deletes = [check_key(key) for key in delete if key not in encoded]
    return encoded, deletes

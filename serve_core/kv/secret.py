"""Where the key that signs stored code comes from.

In order: the ``SERVE_CORE_SECRET`` environment variable (any store); a key file
``<database>.key`` next to a SQLite store, created with mode 0600 on first use; a random
key held by a memory store object (its blobs never outlive the process). Any other
store (PostgreSQL, custom connectors) has no key unless ``SERVE_CORE_SECRET`` is set:
backends that cannot be stored by import path are then refused with a clear error.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

from ..errors import StoreError
from .base import KVStore
from .memory import MemoryKVStore

SECRET_ENV = "SERVE_CORE_SECRET"
MIN_SECRET_LENGTH = 16
KEY_BYTES = 32

log = logging.getLogger("serve_core")


def resolve_secret(store: KVStore) -> bytes | None:
    """The HMAC key for ``store``'s code blobs, or ``None`` if it has none.

    Raises:
        StoreError: ``SERVE_CORE_SECRET`` is too short, or the key file cannot be used.
    """
    env = os.environ.get(SECRET_ENV)
    if env is not None:
        if len(env) < MIN_SECRET_LENGTH:
            raise StoreError(f"{SECRET_ENV} must have at least {MIN_SECRET_LENGTH} characters")
        return env.encode()
    if isinstance(store, MemoryKVStore):
        return store.signing_key
    sqlite_path = getattr(store, "sqlite_path", None)
    if isinstance(sqlite_path, Path):
        return key_file_secret(sqlite_path.with_name(sqlite_path.name + ".key"))
    return None


def key_file_secret(path: Path) -> bytes:
    """Read the key in ``path``, creating it (mode 0600, atomically) if it is missing.

    Raises:
        StoreError: the file cannot be created or read, or holds no key.
    """
    try:
        if not path.exists():
            _create_key_file(path)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("key file %s is readable by others (mode %o); chmod 600 it", path, mode)
        key = path.read_text().strip()
    except OSError as exc:
        raise StoreError(f"cannot use the signing key file {path}: {exc}") from exc
    if len(key) < MIN_SECRET_LENGTH:
        raise StoreError(f"the signing key file {path} holds no valid key; delete it to create a new one")
    return key.encode()


def _create_key_file(path: Path) -> None:
    # Written to a private temporary name, then linked into place: another process
    # sees either no file or a complete one, and a concurrent creator loses cleanly.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(KEY_BYTES) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)

"""How backend code and constructor arguments are written to a store, without a code-execution hole.

* A function or class that re-imports to the very same object is stored by import path,
  ``{"kind": "import", "ref": "module:qualname"}``, and re-imported on recovery.
* Constructor arguments that survive a JSON round trip unchanged are stored as JSON,
  ``{"kind": "json", "value": [...]}``.
* Anything else (lambdas, closures, objects defined in ``__main__``) is a cloudpickle blob
  signed with HMAC-SHA256, ``{"kind": "pickle", "data": base64, "sig": hex}``. The
  signature covers the backend tag and the field, so a blob cannot be moved to another
  backend, and a blob whose signature does not verify is never unpickled.

When the store has a signing key, the whole backend record (import path and JSON
arguments included) is sealed with an HMAC as well, and a record that does not verify is
refused: otherwise whoever can write the database could point a backend at any importable
class and choose its constructor arguments. Stores without a key (PostgreSQL without
``SERVE_CORE_SECRET``) keep only import paths and JSON, and rely on database permissions.

Stores that do not outlive the process keep ``{"kind": "unstored"}`` placeholders instead
of pickling anything.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import importlib
import json
import pickle
import sys
from typing import Any

import cloudpickle

from .errors import StoreError

Record = dict[str, Any]


class Signer:
    """Signs and verifies blobs with HMAC-SHA256; ``key=None`` cannot sign."""

    def __init__(self, key: bytes | None) -> None:
        self._key = key

    @property
    def can_sign(self) -> bool:
        return self._key is not None

    def sign(self, context: str, data: bytes) -> str:
        if self._key is None:
            raise StoreError("no signing key")
        return hmac.new(self._key, context.encode() + b"\0" + data, hashlib.sha256).hexdigest()

    def verify(self, context: str, data: bytes, signature: Any) -> bool:
        if self._key is None or not isinstance(signature, str):
            return False
        return hmac.compare_digest(self.sign(context, data), signature)


def import_ref(obj: Any) -> str | None:
    """``module:qualname`` when importing it gives back ``obj`` itself, else ``None``."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        return None
    if module == "__main__" or "<" in qualname:  # scripts and closures do not re-import
        return None
    if getattr(sys.modules.get(module), "__spec__", None) is None:  # e.g. run from a file by runpy
        return None
    try:  # the module may still be initialising (it calls init itself): what it has defined counts
        found = resolve_ref(f"{module}:{qualname}", while_initializing=True)
    except StoreError:
        return None
    return f"{module}:{qualname}" if found is obj else None


class ModuleInitializingError(StoreError):
    """The module holding a stored backend is still being imported (it is the one calling ``init``)."""


def resolve_ref(ref: str, while_initializing: bool = False) -> Any:
    """Import ``module:qualname``.

    Raises:
        ModuleInitializingError: the module is being imported right now (retry once it is),
            unless ``while_initializing``.
        StoreError: the module or attribute cannot be imported.
    """
    module_name, _, qualname = ref.partition(":")
    # importlib marks a module's spec while the module body runs; CPython's own "partially
    # initialized module" error reads the same flag.
    spec = getattr(sys.modules.get(module_name), "__spec__", None)
    if not while_initializing and getattr(spec, "_initializing", False):
        raise ModuleInitializingError(f"module {module_name!r} is still being imported; {ref!r} is loaded once it is")
    try:
        found: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            found = getattr(found, part)
    except Exception as exc:  # noqa: BLE001 - importing user code can raise anything
        raise StoreError(f"cannot import {ref!r}: {type(exc).__name__}: {exc}") from exc
    return found


def _json_safe(value: list[Any]) -> bool:
    try:
        return bool(json.loads(json.dumps(value, allow_nan=False)) == value)
    except (TypeError, ValueError):
        return False


def _canonical(record: Record) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


class CodeStore:
    """Encodes and decodes backend targets and init arguments for one store.

    Args:
        signer: signs pickled blobs.
        durable: ``False`` for a store that dies with the process: nothing is pickled.
        where: the store's description, used in error messages.
    """

    def __init__(self, signer: Signer, durable: bool, where: str) -> None:
        self.signer = signer
        self.durable = durable
        self.where = where

    def encode_target(self, tag: str, target: Any) -> Record:
        ref = import_ref(target)
        if ref is not None:
            return {"kind": "import", "ref": ref}
        name = getattr(target, "__qualname__", target)
        return self._blob(tag, "target", target, f"{name!r} is not importable")

    def encode_args(self, tag: str, args: tuple[Any, ...]) -> Record:
        if _json_safe(list(args)):
            return {"kind": "json", "value": list(args)}
        return self._blob(tag, "init_args", args, "its init arguments are not JSON-safe")

    def _blob(self, tag: str, field: str, obj: Any, why: str) -> Record:
        if not self.durable:
            return {"kind": "unstored"}
        if not self.signer.can_sign:
            raise StoreError(
                f"backend {tag!r} cannot be stored: {why} (a lambda, closure or object defined in "
                f"__main__), and store {self.where} has no key to sign pickled code; set the "
                "SERVE_CORE_SECRET environment variable, or define it at module level in an importable module"
            )
        try:
            data = cloudpickle.dumps(obj)
        except Exception as exc:  # noqa: BLE001 - pickling user objects can raise anything
            raise StoreError(f"backend {tag!r} cannot be stored: pickling its {field} failed: {exc}") from exc
        sig = self.signer.sign(f"{tag}/{field}", data)
        return {"kind": "pickle", "data": base64.b64encode(data).decode("ascii"), "sig": sig}

    def seal_value(self, key: str, value: Any) -> Any:
        """A registry record as stored: ``{"value": value, "sig": hmac}`` (the bare value without a key).

        The signature covers the store key too, so a record cannot be moved to another key.
        """
        if not self.signer.can_sign:
            return value
        return {"value": value, "sig": self.signer.sign(f"value/{key}", _canonical({"v": value}))}

    def open_value(self, key: str, stored: Any) -> Any:
        """The value of a record written by :meth:`seal_value`, verified when this store has a key.

        Raises:
            StoreError: with a key, the record is unsigned or its signature does not verify.
        """
        wrapped = isinstance(stored, dict) and set(stored) == {"value", "sig"}
        if not self.signer.can_sign:
            return stored["value"] if wrapped else stored
        if not wrapped or not self.signer.verify(f"value/{key}", _canonical({"v": stored["value"]}), stored["sig"]):
            raise StoreError(
                f"record {key!r} in {self.where} is unsigned or its signature does not verify (tampered, written "
                "without the key, or signed with another one); it was ignored. Set it again through serve_core"
            )
        return stored["value"]

    def seal(self, tag: str, record: Record) -> Record:
        """``record`` plus a signature over its canonical JSON (unchanged without a key)."""
        if not self.signer.can_sign:
            return record
        return {**record, "sig": self.signer.sign(f"{tag}/record", _canonical(record))}

    def check(self, tag: str, record: Record) -> Record:
        """Verify a sealed record (any record, when this store has a key).

        Raises:
            StoreError: the record is unsigned or its signature does not verify.
        """
        if not isinstance(record, dict):
            raise StoreError(f"backend {tag!r}: the stored record is not an object")
        body = {k: v for k, v in record.items() if k != "sig"}
        signature = record.get("sig")
        if self.signer.can_sign and not self.signer.verify(f"{tag}/record", _canonical(body), signature):
            raise StoreError(
                f"backend {tag!r}: the signature of its stored record does not verify (tampered, unsigned, "
                "or signed with another key: SERVE_CORE_SECRET or the store's key file changed); it was "
                "not loaded. Re-create the backend to store it again"
            )
        return body

    def decode_target(self, tag: str, record: Record) -> Any:
        """The backend's function or class.

        Raises:
            StoreError: import failed, the signature does not verify, or the record is bad.
        """
        if record.get("kind") == "import":
            return resolve_ref(str(record.get("ref")))
        return self._unblob(tag, "target", record)

    def decode_args(self, tag: str, record: Record) -> tuple[Any, ...]:
        """The backend's init arguments (see :meth:`decode_target`)."""
        if record.get("kind") == "json" and isinstance(record.get("value"), list):
            return tuple(record["value"])
        args = self._unblob(tag, "init_args", record)
        if not isinstance(args, tuple):
            raise StoreError(f"backend {tag!r}: stored init arguments are not a tuple")
        return args

    def _unblob(self, tag: str, field: str, record: Record) -> Any:
        kind = record.get("kind")
        if kind != "pickle":
            raise StoreError(f"backend {tag!r}: its {field} was not stored (record kind {kind!r})")
        try:
            data = base64.b64decode(str(record.get("data")), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise StoreError(f"backend {tag!r}: its stored {field} is not valid base64") from exc
        if not self.signer.verify(f"{tag}/{field}", data, record.get("sig")):
            raise StoreError(
                f"backend {tag!r}: the signature of its pickled {field} does not verify (tampered, or "
                "signed with another key: SERVE_CORE_SECRET or the store's key file changed); it was "
                "not loaded. Re-create the backend to store it again"
            )
        try:
            return pickle.loads(data)  # verified above with our own key
        except Exception as exc:  # noqa: BLE001 - unpickling user code can raise anything
            reason = f"{type(exc).__name__}: {exc}"
            raise StoreError(f"backend {tag!r}: unpickling its {field} failed: {reason}") from exc

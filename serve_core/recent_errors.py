"""``RecentErrors``: the last errors an instance answered calls with, for the dashboard.

Backend runtimes report every query they answer with an error (the backend raised, its
replica died, its call ran past ``call_timeout_s``) through the router's ``count_error``,
which keeps it here: when, an error id, endpoint, backend, the error's kind (the ``kind``
label of ``serve_core_errors_total``) and type. Handle calls and HTTP calls alike are kept;
the HTTP front adds the method and path of a 500 it answered (:meth:`RecentErrors.annotate`).

The error id is attached to the exception object (:func:`error_id`), so the HTTP 500 body, its
log line and the dashboard show the same id for one failure. The same exception answering
several queries (a failed batch) is one record with a ``count``.

Memory is bounded: the last ``capacity`` records; an exception's message and traceback are
kept (truncated) only when the instance runs in debug mode, since they may hold user data.
Recording happens on error paths only, outside the runtime's lock.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import traceback
import uuid
from typing import Any

from .clock import Clock
from .prom import error_kind

ERROR_ID_ATTRIBUTE = "serve_core_error_id"
"""The attribute :func:`error_id` sets on an exception."""

MAX_RECENT_ERRORS = 50
MAX_MESSAGE_CHARS = 1_000
MAX_TRACEBACK_CHARS = 8_000


def new_error_id() -> str:
    return uuid.uuid4().hex[:12]


def error_id(exc: BaseException) -> str:
    """The error id of ``exc``: the one attached before, else a new one, attached now when possible."""
    known = getattr(exc, ERROR_ID_ATTRIBUTE, None)
    if isinstance(known, str):
        return known
    fresh = new_error_id()
    try:
        setattr(exc, ERROR_ID_ATTRIBUTE, fresh)
    except (AttributeError, TypeError):  # an exception type that refuses attributes: an id per report
        pass
    return fresh


def type_name(exc: BaseException | None) -> str:
    """``ValueError`` for built-ins, ``module.Qualified`` for the rest, ``?`` when unknown."""
    if exc is None:
        return "?"
    kind = type(exc)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


@dataclasses.dataclass(slots=True)
class ErrorRecord:
    """One error (``count`` queries answered with it); ``message`` and ``traceback`` in debug mode only."""

    time: float
    error_id: str
    endpoint: str
    backend: str
    kind: str
    type: str
    count: int = 1
    method: str | None = None
    path: str | None = None
    message: str | None = None
    traceback: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready; fields that are not known are left out."""
        return {field: value for field, value in dataclasses.asdict(self).items() if value is not None}


class RecentErrors:
    """The last ``capacity`` errors, newest last; safe to add to and read from any thread.

    Args:
        clock: gives each record its wall time.
        capacity: records kept.
        debug: keep each error's message and traceback (truncated).
    """

    def __init__(self, clock: Clock, *, capacity: int = MAX_RECENT_ERRORS, debug: bool = False) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self._clock = clock
        self._debug = debug
        self._records: collections.deque[ErrorRecord] = collections.deque(maxlen=capacity)
        self._lock = threading.Lock()

    def add(self, endpoint: str, backend: str, error: BaseException) -> str:
        """Keep one error a query of ``endpoint`` was answered with by ``backend``; returns its id."""
        ident = error_id(error)
        with self._lock:
            last = self._records[-1] if self._records else None
            if last is not None and last.error_id == ident and last.endpoint == endpoint:
                last.count += 1  # the same failure answering the rest of its batch
                return ident
        record = ErrorRecord(self._clock.wall(), ident, endpoint, backend, error_kind(error), type_name(error))
        if self._debug:
            record.message = str(error)[:MAX_MESSAGE_CHARS]
            record.traceback = "".join(traceback.format_exception(error))[-MAX_TRACEBACK_CHARS:]
        with self._lock:
            self._records.append(record)
        return ident

    def annotate(self, error_id: str, *, method: str, path: str) -> bool:
        """Add the HTTP request that failed with ``error_id``; False when no record has that id."""
        with self._lock:
            found = [record for record in self._records if record.error_id == error_id]
            for record in found:
                record.method, record.path = method, path
        return bool(found)

    def recent(self) -> list[dict[str, Any]]:
        """The records kept, oldest first, as JSON-ready dicts."""
        with self._lock:
            return [record.as_dict() for record in self._records]

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

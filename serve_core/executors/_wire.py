"""What crosses the pipe between the process executor and its worker processes.

Both sides import this module. Messages are small named dataclasses pickled with
:mod:`pickle` first (fast) and :mod:`cloudpickle` as a fallback (objects defined in
``__main__``, closures, classes defined inside functions). Exceptions travel wrapped
so that they keep their type and gain the worker's traceback as ``__cause__``, the
way ``concurrent.futures.ProcessPoolExecutor`` does it.

Web requests travel as they are: the HTTP front's ``ServeRequest`` pickles itself to a
self-contained copy (see :mod:`serve_core.http.request`).
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import cloudpickle


@dataclasses.dataclass(frozen=True)
class WorkerBoot:
    """How a worker builds its backend: the cloudpickled ``(target, init_args)``."""

    payload: bytes


@dataclasses.dataclass(frozen=True)
class Ready:
    """The worker built its backend and waits for calls."""

    pid: int


@dataclasses.dataclass(frozen=True)
class Failure:
    """The constructor failed (at start-up) or a call could not be decoded."""

    error: BaseException


@dataclasses.dataclass(frozen=True)
class Stop:
    """Finish the calls already sent, then exit."""


def dumps(obj: Any) -> bytes:
    """Pickle with the standard pickler, falling back to cloudpickle.

    Raises:
        Exception: whatever cloudpickle raised when neither could pickle ``obj``.
    """
    try:
        return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - retry with the pickler that handles more
        return cloudpickle.dumps(obj, pickle.HIGHEST_PROTOCOL)

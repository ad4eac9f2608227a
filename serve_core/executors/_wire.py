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
import traceback
from typing import Any

import cloudpickle

from ..errors import ServeError
from ..invoke import Outcome


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


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a worker process."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class _RemoteError:
    """Pickles as an exception that, once unpickled, has its traceback as ``__cause__``."""

    def __init__(self, exc: BaseException, tb: str) -> None:
        self.exc = exc
        self.tb = tb

    def __reduce__(self) -> tuple[Any, tuple[BaseException, str]]:
        return _rebuild_error, (self.exc, self.tb)


def _rebuild_error(exc: BaseException, tb: str) -> BaseException:
    exc.__cause__ = RemoteTraceback(tb)
    return exc


def dumps(obj: Any) -> bytes:
    """Pickle with the standard pickler, falling back to cloudpickle.

    Raises:
        Exception: whatever cloudpickle raised when neither could pickle ``obj``.
    """
    try:
        return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - retry with the pickler that handles more
        return cloudpickle.dumps(obj, pickle.HIGHEST_PROTOCOL)


def wrap_error(exc: BaseException) -> Any:
    """Make ``exc`` ready to cross the pipe with its traceback.

    An exception that does not survive a pickle round trip is replaced by a
    :class:`ServeError` naming it, so the caller still learns what happened.
    """
    tb = "".join(traceback.format_exception(exc))
    wrapped = _RemoteError(exc, f'\n"""\n{tb}"""')
    try:
        pickle.loads(dumps(wrapped))
    except Exception as err:  # noqa: BLE001 - any pickling problem is reported the same way
        replacement = ServeError(
            f"the backend raised {type(exc).__name__}: {exc}, which cannot be sent back from "
            f"the worker process ({type(err).__name__}: {err}); raise a picklable exception instead"
        )
        wrapped = _RemoteError(replacement, wrapped.tb)
    return wrapped


def encode_outcomes(outcomes: list[Outcome]) -> bytes:
    """Pickle a call's outcomes; values that cannot be pickled become a ``ServeError``."""
    outcomes = [o if o.ok else Outcome(False, wrap_error(o.value)) for o in outcomes]
    try:
        return dumps(outcomes)
    except Exception:  # noqa: BLE001 - find which values are the problem
        return dumps([_picklable(o) for o in outcomes])


def _picklable(outcome: Outcome) -> Outcome:
    try:
        dumps(outcome)
    except Exception as err:  # noqa: BLE001
        error = ServeError(
            f"the backend returned a {type(outcome.value).__name__}, which cannot be sent back from "
            f"the worker process ({type(err).__name__}: {err}); return a picklable value instead"
        )
        return Outcome(False, wrap_error(error))
    return outcome

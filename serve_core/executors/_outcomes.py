"""Outcomes across a process boundary: pickling that never loses a call.

A replica in another process returns its :class:`~serve_core.invoke.Outcome` list as
bytes. :func:`dump_outcomes` makes sure those bytes can be written *and* read back:
a value or exception that cannot be pickled becomes a :class:`ServeError` outcome
for that query only, so one bad result never fails its neighbours in a batch nor
looks like a dead replica. Exceptions carry their remote traceback, which becomes
``__cause__`` on the caller's side (as ``concurrent.futures.ProcessPoolExecutor`` does).
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Callable
from typing import Any

import cloudpickle

from ..errors import ServeError
from .base import Outcome


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a replica's process."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


def _with_remote_traceback(exc: BaseException, text: str) -> BaseException:
    exc.__cause__ = RemoteTraceback(text)
    return exc


class _ExceptionWithTraceback:
    """Pickles as its exception, which gets the remote traceback as ``__cause__`` when loaded."""

    def __init__(self, exc: BaseException, text: str | None = None) -> None:
        self.exc = exc
        self.text = text if text is not None else "".join(traceback.format_exception(exc))

    def __reduce__(self) -> tuple[Any, ...]:
        return _with_remote_traceback, (self.exc, f'\n"""\n{self.text}"""')


Dumps = Callable[[Any], bytes]


def remote_error(exc: BaseException, dumps: Dumps = cloudpickle.dumps) -> Any:
    """``exc`` ready to cross a process boundary, with its traceback as ``__cause__`` once loaded.

    An exception that does not survive a pickle round trip is replaced by a
    :class:`ServeError` naming it (keeping the original traceback), so the caller still
    learns what happened.
    """
    text = "".join(traceback.format_exception(exc))
    return _ExceptionWithTraceback(_checked(Outcome(False, exc), dumps).value, text)


def dump_outcomes(outcomes: list[Outcome], dumps: Dumps = cloudpickle.dumps) -> bytes:
    """Pickle a call's outcomes; unpicklable ones become ``ServeError`` outcomes.

    Args:
        outcomes: what ``Invoker.run`` returned.
        dumps: the cloudpickle that also pickled the backend (Ray vendors its own): classes
            it sent by value are then recognised, and keep their identity, when they come back.
    """
    wire = [_prepare(outcome, dumps) for outcome in outcomes]
    try:
        return pickle.dumps(wire, pickle.HIGHEST_PROTOCOL)  # the C pickler: fast
    except Exception:  # noqa: BLE001 - e.g. classes that only cloudpickle can send by value
        pass
    try:
        return dumps(wire)
    except Exception:  # noqa: BLE001 - find the culprits one by one below
        return dumps([_checked(outcome, dumps) for outcome in wire])


def _prepare(outcome: Outcome, dumps: Dumps) -> Outcome:
    if outcome.ok:
        return outcome
    return Outcome(False, remote_error(outcome.value, dumps))  # errors are rare: check they load back


def _checked(outcome: Outcome, dumps: Dumps) -> Outcome:
    try:
        pickle.loads(dumps(outcome.value))
    except Exception as exc:  # noqa: BLE001 - any pickling failure is reported the same way
        what = "result" if outcome.ok else "exception"
        return Outcome(
            False,
            ServeError(
                f"the backend's {what} {_describe(outcome.value)} cannot be sent back from "
                f"the replica: {type(exc).__name__}: {exc}; {'return' if outcome.ok else 'raise'} "
                "a picklable value instead"
            ),
        )
    return outcome


def _describe(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real problem
        text = "<unrepresentable>"
    return f"of type {type(value).__name__} ({text[:200]})"

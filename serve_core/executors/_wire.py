"""What crosses the pipe between the process executor and its worker processes.

Both sides import this module. Messages are small named dataclasses pickled with
:mod:`pickle` first (fast) and :mod:`cloudpickle` as a fallback (closures, classes
defined inside functions, and whatever the standard pickler would name as ``__main__.x``:
workers never run the user's script, so those are sent by value). Exceptions travel
wrapped so that they keep their type and gain the worker's traceback as ``__cause__``, the
way ``concurrent.futures.ProcessPoolExecutor`` does it.

A worker of an async backend runs its calls concurrently, so its answers come back in any
order: each is :data:`SEQ` (the call's number: the n-th call the parent sent is number n,
counting from 0) followed by the pickled outcomes. A synchronous worker answers in order,
without it.

Web requests travel as they are: the HTTP front's ``ServeRequest`` pickles itself to a
self-contained copy (see :mod:`serve_core.http.request`).
"""

from __future__ import annotations

import dataclasses
import pickle
import struct
from typing import Any

import cloudpickle


@dataclasses.dataclass(frozen=True)
class WorkerBoot:
    """The first message to a worker: set itself up like its parent, then build the backend.

    What multiprocessing's ``spawn`` copies from the parent, except the main module.
    """

    payload: bytes  # the cloudpickled (target, init_args)
    name: str  # multiprocessing.current_process().name, e.g. "serve-replica-b#1"
    sys_path: tuple[str, ...]  # what the backend refers to by module name is imported from there
    cwd: str
    argv: tuple[str, ...]
    authkey: bytes  # multiprocessing's: proxies of the parent's managers connect from the worker
    instance_id: str = ""  # the parent's instance: handles in the replica call it ("": they cannot)
    backend_tag: str = ""


SEQ = struct.Struct("<Q")
"""The call number in front of a concurrent worker's answers."""


@dataclasses.dataclass(frozen=True)
class Ready:
    """The worker built its backend and waits for calls.

    ``concurrent``: it runs them as tasks on an event loop (an async backend), answering with
    their number in front, and takes :class:`Cancel`.
    """

    pid: int
    concurrent: bool = False


@dataclasses.dataclass(frozen=True)
class Cancel:
    """Cancel the task of call number ``seq``, if it still runs (concurrent workers only)."""

    seq: int


@dataclasses.dataclass(frozen=True)
class Failure:
    """The constructor failed (at start-up) or a call could not be decoded."""

    error: BaseException


@dataclasses.dataclass(frozen=True)
class Stop:
    """Finish the calls already sent, then exit."""


# Streams (see _pipe_stream): call number n's generator, its items and its end.
STREAM_WINDOW = 64
"""Items a worker may send for one stream before the parent grants more (:class:`Credit`)."""


@dataclasses.dataclass(frozen=True)
class StreamOpened:
    """The outcome value of a call that streams: its first item(s); ``ended``: nothing more comes.

    ``seq`` names the stream where the replica does not number its calls (a Ray actor).
    """

    first: list[Any]
    ended: bool = False
    seq: int = -1


@dataclasses.dataclass(frozen=True)
class StreamItems:
    """Worker to parent: the next items of call ``seq``'s stream."""

    seq: int
    items: list[Any]


@dataclasses.dataclass(frozen=True)
class StreamEnd:
    """Worker to parent: call ``seq``'s generator is done (closed, its ``finally`` run), with its error."""

    seq: int
    error: Any = None


@dataclasses.dataclass(frozen=True)
class Credit:
    """Parent to worker: the reader took ``count`` items of call ``seq``'s stream; send as many more."""

    seq: int
    count: int


@dataclasses.dataclass(frozen=True)
class CloseStream:
    """Parent to worker: the reader closed call ``seq``'s stream; close its generator."""

    seq: int


def dumps(obj: Any) -> bytes:
    """Pickle with the standard pickler, falling back to cloudpickle.

    A pickle that names ``__main__`` (a class or function of the parent's script, by
    reference) is made again with cloudpickle, which sends those by value. A false alarm
    (the text ``__main__`` in the data) only costs the slower pickler.

    Raises:
        Exception: whatever cloudpickle raised when neither could pickle ``obj``.
    """
    try:
        data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - retry with the pickler that handles more
        return cloudpickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    if b"__main__" in data:
        return cloudpickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    return data

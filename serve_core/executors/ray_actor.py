"""Inside a Ray replica: the actor that runs calls and counts them in its progress file.

A :class:`ReplicaActor` starts as an empty *host* (a Ray worker that has imported
serve_core) and becomes a replica when :meth:`ReplicaActor.build` builds a backend in it;
the executor keeps one host warm as a spare, so a replacement skips Ray's worker start.

Progress: before it starts a call and after it finishes one, the actor writes its two
counters (calls started, calls finished, over its whole life) into its progress file
(:mod:`.ray_progress`), which outlives it: once it is dead, the parent reads which of the
calls it held had started.

Time slices: a message's calls run one by one until they are done or the message has
run for :data:`REPLY_SLICE_S`; the rest wait in the actor for its next message. So a
reply never holds answers back for long, and a crash loses the answers of at most one
slice of finished calls, while a message of many quick calls still comes back as one reply.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import ray
from ray import cloudpickle  # Ray's own copy: classes sent by value keep their identity

from ..errors import ServeError
from ..invoke import END, Generated, Invoker
from ._outcomes import dump_outcomes, remote_error
from ._stream import generated_of, open_stream
from ._wire import StreamOpened
from .base import Call, Outcome

if TYPE_CHECKING:
    from .ray_gateway import LinkInfo
from .ray_progress import ProgressFile, process_started_at, progress_dir

REPLY_SLICE_S = 0.005
"""How long a message's calls run before the actor replies with the answers so far.

At least one call runs per message. Quick calls (a no-op takes ~25 µs) still fill one
reply per message; calls slower than this come back one by one, as soon as each is done.
"""

Answer = bytes | str  # a call's pickled outcomes, or why the call could not be read


@dataclasses.dataclass(frozen=True)
class HostInfo:
    """What an actor tells its parent once a backend is built in it."""

    node_id: str  # the Ray node it runs on
    pid: int
    started_at: str  # the process's start time (/proc), so that a reused pid is not mistaken for it
    progress_path: str  # its progress file, on its node
    error: Exception | None = None  # the backend constructor's error


class ReplicaActor:
    """The object living inside each Ray actor: a host until :meth:`build`, then a replica."""

    def __init__(self) -> None:
        self._invoker: Invoker | None = None
        self._pending: deque[bytes] = deque()  # calls received but not started, oldest first
        self._started = 0
        self._finished = 0
        self._progress = ProgressFile(progress_dir())
        self._streams: dict[int, Generated] = {}  # open streams by the number of the call that opened them

    def build(self, target: Any, init_args: tuple[Any, ...], link: LinkInfo | None = None) -> HostInfo:
        """Build the backend (its handles reach the instance through ``link``); the constructor's error is reported."""
        error: Exception | None = None
        try:
            self._invoker = Invoker(target, init_args, scope=link.open() if link is not None else None)
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            error = exc
        pid = os.getpid()
        node_id = ray.get_runtime_context().get_node_id()
        return HostInfo(node_id, pid, process_started_at(pid), self._progress.path, error)

    def run(self, calls: list[bytes]) -> list[Answer]:
        """Queue ``calls`` behind those left over, run them in order for one time slice; their answers."""
        self._pending.extend(calls)
        answers: list[Answer] = []
        deadline = time.monotonic() + REPLY_SLICE_S
        while self._pending:
            answers.append(self._run(self._pending.popleft()))
            if time.monotonic() >= deadline:
                break
        return answers

    def run_one(self, data: bytes) -> Answer | list[Answer]:
        """One call, sent bare (Ray carries one bytes argument faster than a list)."""
        if self._pending:  # calls left over from a slice run first
            return self.run([data])
        return self._run(data)

    def _run(self, data: bytes) -> Answer:
        """Run one pickled call, counted in the progress file.

        Returns the call's pickled outcomes (user errors are outcomes), or, for a call
        that cannot be unpickled here, why not: one bad call never costs its neighbours.
        """
        if self._invoker is None:
            raise ServeError("no backend was built in this actor")
        self._started += 1
        self._progress.started(self._started)
        try:
            try:
                call: Call = pickle.loads(data)
            except Exception as exc:  # noqa: BLE001 - e.g. a class this process cannot import
                return f"{type(exc).__name__}: {exc}"
            outcomes = self._invoker.run(call)
            gen = generated_of(outcomes)
            if gen is not None:
                outcomes = self._open_stream(self._started, gen)
            return dump_outcomes(outcomes, cloudpickle.dumps)
        finally:
            self._finished += 1
            self._progress.finished(self._finished)

    # ---------------------------------------------------------------- streams
    def _open_stream(self, seq: int, gen: Generated) -> list[Outcome]:
        """Run the generator to its first item: the call's answer; the rest is pulled (:meth:`stream_next`)."""
        outcome, channel = open_stream(gen)
        if not outcome.ok:
            return [outcome]
        first = outcome.value.read(0)
        if channel is not None:
            self._streams[seq] = gen
        return [Outcome(True, StreamOpened(first, channel is None, seq))]

    def stream_next(self, seq: int, most: int) -> bytes:
        """Up to ``most`` more items of stream ``seq`` (at least one, for at most a time slice).

        Returns the pickled ``(items, ended, error)``; an ended stream's generator is closed.
        """
        gen = self._streams.get(seq)
        items: list[Any] = []
        ended, error = gen is None, None
        deadline = time.monotonic() + REPLY_SLICE_S
        try:
            while gen is not None and len(items) < most:
                item = gen.next()
                if item is END:
                    ended = True
                    break
                items.append(item)
                if time.monotonic() >= deadline:
                    break
        except BaseException as exc:  # noqa: BLE001 - a mid-stream failure ends the stream with it
            ended, error = True, exc
        if ended and gen is not None:
            error = _closed(self._streams.pop(seq), error)
        try:
            return cloudpickle.dumps((items, ended, None if error is None else remote_error(error, cloudpickle.dumps)))
        except Exception as exc:  # noqa: BLE001 - an item that cannot cross
            self._streams.pop(seq, None)
            unsent = ServeError(f"a stream item cannot be sent back from the actor: {exc!r}")
            _closed(gen, None)
            return cloudpickle.dumps(([], True, remote_error(unsent, cloudpickle.dumps)))

    def stream_close(self, seq: int) -> None:
        """The reader closed stream ``seq``: close its generator (its ``finally`` runs here)."""
        gen = self._streams.pop(seq, None)
        if gen is not None:
            _closed(gen, None)


def _closed(gen: Generated | None, error: BaseException | None) -> BaseException | None:
    """Close a generator; the error it ended with, or the one its ``finally`` raised."""
    try:
        if gen is not None:
            gen.close()
    except BaseException as exc:  # noqa: BLE001 - its finally failed
        return error or exc
    return error

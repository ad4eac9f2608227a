"""A Ray replica's progress file: which calls its actor had started, readable once it is dead.

The actor (:mod:`.ray_actor`) writes two counters, calls started and calls finished over
its whole life, into a 16-byte file mapped into its memory, before it starts a call and
after it finishes one (a store of 8 bytes each: nothing on the hot path). A crash cannot
take back what was written there: the page cache keeps it. Once the actor is dead, its
replica (:mod:`.ray_replica`) reads the counters, in this process when the actor ran on
this node, else with a small Ray task on the actor's node, and each call the actor held
learns its fate (:func:`fate`): not started, it goes back to the queue.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import mmap
import os
import struct
import tempfile
import threading
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..errors import NotDeliveredError, ReplicaDiedError

log = logging.getLogger("serve_core")

PROGRESS_WAIT_S = 5.0
"""How long the progress reader waits for a dead actor's process to be gone before reading."""

_COUNTERS = struct.Struct("<QQ")  # calls started, calls finished
_COUNTER = struct.Struct("<Q")  # one of them
_FINISHED_OFFSET = _COUNTER.size

REMOTE_PROGRESS_TIMEOUT_S = 15.0
"""How long the task that reads a dead actor's progress on another node may take (it waits
for the process to be gone, up to :data:`PROGRESS_WAIT_S`, on a worker it may start)."""


@dataclasses.dataclass(frozen=True)
class Progress:
    """A dead actor's counters: calls started and calls finished over its life."""

    started: int
    finished: int


class ProgressFile:
    """The actor's side of the progress file: two counters written through a shared mapping."""

    def __init__(self, directory: str) -> None:
        fd, self.path = tempfile.mkstemp(prefix="serve_core-progress-", dir=directory)
        try:
            os.ftruncate(fd, _COUNTERS.size)
            self._map = mmap.mmap(fd, _COUNTERS.size)  # MAP_SHARED: writes reach the page cache
        finally:
            os.close(fd)

    def started(self, count: int) -> None:
        _COUNTER.pack_into(self._map, 0, count)

    def finished(self, count: int) -> None:
        _COUNTER.pack_into(self._map, _FINISHED_OFFSET, count)


def read_progress(path: str, pid: int, started_at: str, wait_s: float = PROGRESS_WAIT_S) -> Progress | str:
    """A dead actor's counters, once its process is gone; or why they cannot be known.

    Removes the file. Runs in the parent when the actor was on its node, else as a Ray
    task on the actor's node. The process must be gone first: an actor that Ray reports
    dead while its process still runs could start another call after the read.
    """
    if not _wait_gone(pid, started_at, wait_s):
        return f"its process (pid {pid}) was still running {wait_s:g} s after Ray reported it dead"
    try:
        with open(path, "rb") as file:
            data = file.read(_COUNTERS.size)
    except OSError as exc:
        return f"its progress file could not be read: {exc}"
    remove_progress(path)
    if len(data) != _COUNTERS.size:
        return f"its progress file {path} holds {len(data)} bytes"
    return Progress(*_COUNTERS.unpack(data))


def remove_progress(path: str) -> None:
    """Delete a progress file (it may be gone already)."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def process_started_at(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot ('' without ``/proc`` or once gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            fields = file.read().rpartition(b")")[2].split()
    except OSError:
        return ""
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):  # a zombie has run its last instruction
        return ""
    return fields[19].decode()


def _wait_gone(pid: int, started_at: str, wait_s: float) -> bool:
    pause = threading.Event()
    deadline = time.monotonic() + wait_s
    while _runs(pid, started_at):
        if time.monotonic() >= deadline:
            return False
        pause.wait(0.01)  # polling the process table, bounded by wait_s
    return True


def _runs(pid: int, started_at: str) -> bool:
    if started_at:
        return process_started_at(pid) == started_at
    try:  # no /proc (macOS): the pid alone
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def progress_dir() -> str:
    """The Ray session's directory on this node (its files go with the session), else the temp dir."""
    # ray._private is Ray's internal API: used only to find the directory, with a fallback.
    node = getattr(getattr(ray, "_private", None), "worker", None)
    node = getattr(getattr(node, "global_worker", None), "node", None)
    try:
        session = node.get_session_dir_path() if node is not None else None
    except Exception:  # noqa: BLE001 - any failure: the temp dir will do
        session = None
    return session if session and os.path.isdir(session) else tempfile.gettempdir()


_read_remotely = ray.remote(num_cpus=0, max_retries=0)(read_progress)
_remove_remotely = ray.remote(num_cpus=0, max_retries=0)(remove_progress)

# ray.get without the wrapper that starts a new Ray when none is running.
_ray_get = getattr(ray.get, "__wrapped__", ray.get)


def read_dead(path: str, pid: int, started_at: str, node_id: str, local: bool) -> Progress | str:
    """:func:`read_progress` of a dead actor, here (``local``) or on its node ``node_id``."""
    if local:
        return read_progress(path, pid, started_at)
    if not ray.is_initialized():
        return "Ray is shut down, and the actor ran on another node"
    try:
        task = _read_remotely.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
        result: Progress | str = _ray_get(task.remote(path, pid, started_at), timeout=REMOTE_PROGRESS_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - e.g. the node is gone with the actor
        return f"its node could not be asked: {first_line(exc)}"
    return result


def forget(path: str, node_id: str, local: bool) -> None:
    """Remove the progress file of an actor that held no call (best effort on another node)."""
    if local:
        remove_progress(path)
        return
    try:
        if ray.is_initialized():
            strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
            _remove_remotely.options(scheduling_strategy=strategy).remote(path)
    except Exception:  # noqa: BLE001 - it lives in the Ray session's directory and goes with it
        log.debug("removing the progress file %s failed", path, exc_info=True)


def fate(replica_id: str, index: int, progress: Progress | str, error: BaseException) -> BaseException:
    """What call ``index`` of a dead actor's life gets: requeued if it had not started, else failed."""
    why = first_line(error)
    head = f"replica {replica_id} (Ray actor) died"
    if isinstance(progress, str):
        died: BaseException = ReplicaDiedError(
            f"{head} holding the call, and whether it had started is unknown ({progress}): {why}"
        )
    elif index < progress.finished:
        died = ReplicaDiedError(f"{head} after running the call, before its answer came back: {why}")
    elif index < progress.started:
        died = ReplicaDiedError(f"{head} during the call: {why}")
    else:
        died = NotDeliveredError(f"{head} before the call started: {why}")
    died.__cause__ = error
    return died


def summary(first: int, count: int, progress: Progress | str) -> str:
    """How the ``count`` calls from ``first`` on fared, for the log."""
    if isinstance(progress, str):
        return f"all failed: {progress}"
    end = first + count
    started = max(first, min(end, progress.started))
    finished = max(first, min(end, progress.finished))
    return f"{finished - first} answered too late, {started - finished} running, {end - started} requeued"


def first_line(error: BaseException) -> str:
    """The gist of an error: Ray's death reports run to a dozen lines (the whole one is ``__cause__``)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

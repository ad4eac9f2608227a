"""Which processes a test left behind: live descendants of this process, from ``/proc``."""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable

# multiprocessing's own helpers live as long as the interpreter by design.
_INFRASTRUCTURE = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")
# The shared local Ray of the tests (and its workers) lives for the whole session; the
# Ray tests check separately that no serve actor survives an instance.
_RAY = ("ray::", "/ray/", "raylet", "gcs_server")


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _parents() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read(f"/proc/{entry}/stat")
            if stat:  # "pid (comm) state ppid ..."; comm may contain spaces
                parents[int(entry)] = int(stat.rpartition(")")[2].split()[1])
    return parents


def descendants(root: int | None = None) -> set[int]:
    """Pids of processes below ``root`` (default: this process), helpers excluded."""
    if not os.path.isdir("/proc"):
        return {p.pid for p in multiprocessing.active_children() if p.pid is not None}
    root = os.getpid() if root is None else root
    parents = _parents()
    found: set[int] = set()
    frontier = {root}
    while frontier:
        # Ray's processes and everything below them (workers, their zombies) are Ray's.
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier and not _runs_ray(pid)} - found
        found |= frontier
    return {pid for pid in found if not _is_helper(pid, parents)}


def _is_helper(pid: int, parents: dict[int, int]) -> bool:
    # Children forked by the forkserver (our workers) inherit its command line: only
    # the helper itself, whose parent is not such a helper, is excluded.
    return _runs_helper(pid) and not _runs_helper(parents.get(pid, 0))


def _runs_helper(pid: int) -> bool:
    cmdline = _read(f"/proc/{pid}/cmdline")
    return any(name in cmdline for name in _INFRASTRUCTURE)


def _runs_ray(pid: int) -> bool:
    cmdline = _read(f"/proc/{pid}/cmdline")
    return any(marker in cmdline for marker in _RAY)


def describe_processes(pids: set[int]) -> list[str]:
    """``pid: command line`` of each process, for failure messages."""
    return [f"{pid}: {_read(f'/proc/{pid}/cmdline').replace(chr(0), ' ').strip()}" for pid in sorted(pids)]


def is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    stat = _read(f"/proc/{pid}/stat")
    return bool(stat) and stat.rpartition(")")[2].split()[0] != "Z"


def wait_until(condition: Callable[[], object], timeout: float) -> bool:
    """Poll ``condition()`` every 20 ms for up to ``timeout`` seconds (bounded waiting, not a sleep)."""
    pause = threading.Event()
    for _ in range(max(1, int(timeout / 0.02))):
        if condition():
            return True
        pause.wait(0.02)
    return bool(condition())

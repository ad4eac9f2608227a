"""A watchdog for the local Ray that the Ray executor starts: it ends with its parent, even by SIGKILL.

``ray.init(address="local")`` starts Ray's head processes as children of this process,
and they die with it; but the agents the raylet starts (``DashboardAgent``,
``RuntimeEnvAgent``) notice the raylet's death, then hang for about a minute reporting
it to a GCS that is gone. So the executor starts this watchdog beside Ray: a small
process (this file run as a script, standard library only, in a session of its own so
that a Ctrl-C to the parent's group leaves it running) that holds the read end of a pipe
whose write end only the parent holds.

While the parent lives, the watchdog records, every :data:`SNAPSHOT_S`, the process tree
under Ray's head processes (pid and start time, so that a reused pid is never taken for
one of them). When the pipe reaches its end without a "stop" first, or the parent's pid
is gone, the parent died: the watchdog kills every recorded process still running, and
every process that names one of the recorded raylets as its ``RAY_RAYLET_PID`` (the
workers and agents started since the last record), then exits. After "stop" (the
executor's ``shutdown`` has called ``ray.shutdown()``), it only kills what is still
running :data:`STOP_GRACE_S` later. Linux only (it reads ``/proc``).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time

SNAPSHOT_S = 1.0
"""How often the watchdog records the process tree under Ray's head processes."""

STOP_GRACE_S = 5.0
"""After a normal stop, how long Ray's processes get to exit before the watchdog kills them."""

STOP_MESSAGE = b"stop\n"

Tree = dict[int, str]  # pid -> start time in clock ticks since boot


# ------------------------------------------------------------------ the parent's side
def available() -> bool:
    """Whether the watchdog can run here (it needs ``/proc``)."""
    return os.path.isdir("/proc/self")


def children(parent: int) -> Tree:
    """The live children of ``parent``: pid -> start time."""
    found: Tree = {}
    for pid, ppid, started in _processes():
        if ppid == parent:
            found[pid] = started
    return found


class Watchdog:
    """The parent's handle of a running watchdog (see the module docstring).

    Args:
        roots: Ray's head processes (children of this process started by ``ray.init``).
    """

    def __init__(self, roots: Tree) -> None:
        read_end, self._write_end = os.pipe()  # both non-inheritable; the child gets read_end as stdin
        roots_arg = ",".join(f"{pid}:{started}" for pid, started in sorted(roots.items()))
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-I", os.path.abspath(__file__), str(os.getpid()), roots_arg],
                stdin=read_end, stdout=subprocess.DEVNULL, start_new_session=True,
            )
        except BaseException:
            os.close(self._write_end)
            raise
        finally:
            os.close(read_end)

    @property
    def pid(self) -> int:
        return self._process.pid

    def stop(self, timeout: float = STOP_GRACE_S + 5.0) -> None:
        """Tell the watchdog Ray was shut down on purpose; wait (bounded) for it to exit."""
        if self._write_end < 0:
            return
        with contextlib.suppress(OSError):  # it may be gone already
            os.write(self._write_end, STOP_MESSAGE)
        os.close(self._write_end)
        self._write_end = -1
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout)


# --------------------------------------------------------------- the watchdog's side
def main(argv: list[str]) -> int:
    parent = int(argv[1])
    roots: Tree = {}
    for item in filter(None, argv[2].split(",")):
        pid, _, started = item.partition(":")
        roots[int(pid)] = started
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the parent; its death is ours
    parent_started = _started_at(parent)
    stopped = _watch(parent, parent_started, roots)
    if stopped:
        _wait_gone(roots, STOP_GRACE_S)
    _kill_all(roots)
    return 0


def _watch(parent: int, parent_started: str, tree: Tree) -> bool:
    """Record the tree until the parent stops us (True) or dies (False)."""
    received = b""
    while True:
        tree.update(_descendants(tree))
        ready, _, _ = select.select([0], [], [], SNAPSHOT_S)
        if ready:
            data = os.read(0, 64)
            received += data
            if not data:
                return STOP_MESSAGE in received
        if _started_at(parent) != parent_started:  # gone, or its pid reused
            return False


def _kill_all(tree: Tree) -> None:
    """SIGKILL whatever of ``tree`` still runs, and the processes raylets of it started since."""
    raylet_pids = set(tree)
    late = {pid: started for pid, _, started in _processes() if pid not in tree and _child_of_raylet(pid, raylet_pids)}
    floor = min((int(s) for s in tree.values() if s.isdigit()), default=0)
    late = {pid: s for pid, s in late.items() if s.isdigit() and int(s) >= floor}
    for pid, started in {**tree, **late}.items():
        if pid != os.getpid() and _started_at(pid) == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _wait_gone(tree: Tree, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(_started_at(pid) == started for pid, started in tree.items()):
        if time.monotonic() >= deadline:
            return
        time.sleep(0.05)  # this process has nothing else to do


def _descendants(tree: Tree) -> Tree:
    """Live processes whose parent is in ``tree``, recursively."""
    by_parent: dict[int, list[tuple[int, str]]] = {}
    for pid, ppid, started in _processes():
        by_parent.setdefault(ppid, []).append((pid, started))
    found: Tree = {}
    frontier = [pid for pid, started in tree.items() if _started_at(pid) == started]
    while frontier:
        for child, started in by_parent.get(frontier.pop(), []):
            if child not in found and child not in tree:
                found[child] = started
                frontier.append(child)
    return found


def _child_of_raylet(pid: int, raylets: set[int]) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as file:
            environ = file.read().split(b"\0")
    except OSError:
        return False
    for entry in environ:
        if entry.startswith(b"RAY_RAYLET_PID="):
            value = entry.partition(b"=")[2]
            return value.isdigit() and int(value) in raylets
    return False


def _processes() -> list[tuple[int, int, str]]:
    """(pid, parent pid, start time) of every live process."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if len(fields) > 19 and fields[0] not in ("Z", "X"):
                found.append((int(entry), int(fields[1]), fields[19]))
    return found


def _started_at(pid: int) -> str:
    """The start time of a live process ('' once it is gone or a zombie)."""
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 and fields[0] not in ("Z", "X") else ""


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name: state, ppid, ... (empty if gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read().decode(errors="replace")
    except OSError:
        return []
    return stat.rpartition(")")[2].split()  # the command name may contain spaces and parentheses


if __name__ == "__main__":
    sys.exit(main(sys.argv))

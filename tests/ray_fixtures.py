"""A local Ray for the tests: started once on first use, shut down at the end of the session.

Starting Ray takes seconds, so tests share one local instance (``num_cpus=2``, no
dashboard) instead of starting their own. A test that needs a different Ray (the
multi-node cluster) shuts this one down; the next test that asks starts it again.

The shared Ray is always a new local one (``address="local"``): without an address
``ray.init`` would join any cluster that ``ray start`` started on the machine, or the one
``RAY_ADDRESS`` names, and then refuse ``num_cpus``. :func:`foreign_ray` starts such a
cluster, for the tests that check nothing of ours joins it unasked.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .procs import is_running, wait_until

LOCAL_RAY: dict[str, Any] = {
    "address": "local",  # a Ray of our own, whatever else runs on the machine
    "num_cpus": 2,
    "include_dashboard": False,
    "log_to_driver": False,
    "configure_logging": False,
}

WAIT = 10.0  # seconds, as tests.conftest.WAIT (not imported: conftest imports this module)
FOREIGN_START_TIMEOUT_S = 60.0  # `ray start --head` takes 2-3 s on the 2-core machine
FOREIGN_STOP_TIMEOUT_S = 60.0  # on SIGTERM the node drains (up to 30 s), then ends its processes


def ray_missing_reason() -> str:
    return "ray is not installed (pip install 'serve-core[ray]')"


@pytest.fixture(scope="session")
def _ray_session() -> Iterator[None]:
    yield
    if importlib.util.find_spec("ray") is not None:
        import ray

        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture
def ray_local(_ray_session: None) -> Any:
    """The ``ray`` module, initialised as a local 2-CPU node (skips, or fails in CI, without Ray)."""
    from .conftest import require

    require(importlib.util.find_spec("ray") is not None, ray_missing_reason())
    return start_local_ray()


def start_local_ray() -> Any:
    """The ``ray`` module, initialised with :data:`LOCAL_RAY` unless Ray already is."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(**LOCAL_RAY)
    return ray


@pytest.fixture(name="ray_cluster")
def ray_cluster_fixture() -> Iterator[Any]:
    """A ``ray.cluster_utils.Cluster`` on this machine: a one-CPU head; the test adds nodes.

    The shared local Ray is shut down first (the next test that asks starts it again).
    ``Cluster.shutdown`` kills each raylet, whose agents then hang for about a minute
    reporting its death to a GCS that is gone: whatever of the cluster's process tree,
    as it was just before, outlives the shutdown is killed by pid (start time checked).
    """
    from .conftest import require

    require(importlib.util.find_spec("ray") is not None, ray_missing_reason())
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        yield cluster
    finally:
        tree = _process_tree(os.getpid())
        tree.pop(os.getpid(), None)
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        if not wait_until(lambda: not _survivors(tree), 5.0):
            kill_survivors(tree)


@dataclass(frozen=True)
class ForeignRay:
    """A Ray cluster that someone else started on this machine with ``ray start --head``."""

    address: str  # its GCS, host:port, as recorded in ray_current_cluster
    temp_root: Path  # its RAY_TMPDIR: a test that sets the same one sees the cluster as ray.init does
    process: subprocess.Popen[bytes]  # `ray start --block`, parent of the cluster's processes


@pytest.fixture
def foreign_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForeignRay]:
    """A one-CPU Ray head started by ``ray start``, and stopped, with its processes, after the test.

    It lives under its own ``RAY_TMPDIR`` (a temp dir of the test session), so it neither
    overwrites nor is found through the machine's ``/tmp/ray/ray_current_cluster``, which
    other sessions' clusters use: a test puts the same ``RAY_TMPDIR`` in its environment to
    be in the situation of a process on a machine where someone ran ``ray start``. It
    binds no fixed port (``--port=0``: the GCS port is Ray's pick, read from the address file).
    """
    from .conftest import require

    require(importlib.util.find_spec("ray") is not None, ray_missing_reason())
    # Short: Ray's Unix socket paths under it must fit in 107 bytes.
    temp_root = tmp_path_factory.mktemp("ray")
    env = {**os.environ, "RAY_TMPDIR": str(temp_root), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--port=0", "--num-cpus=1",
        "--include-dashboard=false", "--disable-usage-stats", "--block",
    ]
    with open(temp_root / "ray-start.log", "wb") as log:
        # In our process group, so that an interrupted run (Ctrl-C) takes it down too.
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield ForeignRay(_wait_for_address(temp_root, process), temp_root, process)
    finally:
        _stop_foreign_ray(process)


def _wait_for_address(temp_root: Path, process: subprocess.Popen[bytes]) -> str:
    """The address ``ray start`` records once its head node runs; fails the test if it does not."""
    address_file = temp_root / "ray" / "ray_current_cluster"
    wait_until(lambda: address_file.exists() or process.poll() is not None, FOREIGN_START_TIMEOUT_S)
    if not address_file.exists():
        log = (temp_root / "ray-start.log").read_text(errors="replace")
        pytest.fail(f"`ray start --head` started no cluster in {FOREIGN_START_TIMEOUT_S} s:\n{log[-3000:]}")
    return address_file.read_text().strip()


def _stop_foreign_ray(process: subprocess.Popen[bytes]) -> None:
    """Stop that cluster and nothing else.

    Never ``ray stop``: it kills every Ray process on the machine, other sessions' too.
    ``ray start --block`` ends the processes it started when it gets SIGTERM. Whatever of
    its process tree, as it was just before, outlives it (workers have process groups
    of their own) is killed by pid, each checked against its start time so that a pid
    reused meanwhile is left alone.
    """
    tree = _process_tree(process.pid)
    process.terminate()
    try:
        process.wait(FOREIGN_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(FOREIGN_STOP_TIMEOUT_S)
    if not wait_until(lambda: not _survivors(tree), 10.0):
        kill_survivors(tree)


def session_processes(temp_root: Path) -> dict[int, str]:
    """Live processes started with ``RAY_TMPDIR=<temp_root>`` in their environment: pid -> start time.

    A Ray started under a temp root of its own passes it to every process it starts,
    so this names one Ray session's processes and no other's.
    """
    marker = f"RAY_TMPDIR={temp_root}".encode()
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ and is_running(int(entry)) and (started := _start_time(int(entry))):
            found[int(entry)] = started
    return found


def kill_survivors(tree: dict[int, str]) -> None:
    """SIGKILL the processes of ``tree`` still running (each checked against its start time)."""
    for pid in _survivors(tree):
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            os.kill(pid, signal.SIGKILL)


def _survivors(tree: dict[int, str]) -> set[int]:
    return {pid for pid, started in tree.items() if _start_time(pid) == started and is_running(pid)}


def _process_tree(root: int) -> dict[int, str]:
    """``root`` and its descendants, from ``/proc``: pid -> start time (in clock ticks since boot)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        stat = _stat_fields(int(entry)) if entry.isdigit() else []
        if stat:
            children.setdefault(int(stat[1]), []).append(int(entry))
    tree: dict[int, str] = {}
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        if (started := _start_time(pid)) and pid not in tree:
            tree[pid] = started
            frontier.extend(children.get(pid, []))
    return tree


def _start_time(pid: int) -> str:
    fields = _stat_fields(pid)
    return fields[19] if len(fields) > 19 else ""


def _stat_fields(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name: state, ppid, ... (empty if gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat.rpartition(")")[2].split()  # the command name may contain spaces and parentheses


def serve_actor_names(ray: Any, prefix: str) -> list[str]:
    """Names of the live actors named with ``prefix`` (an executor's ``actor_name_prefix``)."""
    actors = ray.util.list_named_actors(all_namespaces=True)
    return [a["name"] for a in actors if a["name"].startswith(prefix)]


def replica_actor_names(srv: Any, tag: str) -> list[str]:
    """The names of the actors hosting the replicas of ``tag`` (a replica built in a spare keeps its name)."""
    return [replica.actor_name for replica in srv.replicas(tag)]


class Blocker:
    """A backend whose ``block=True`` calls set ``started``, then wait for ``release``.

    Other calls return ``i`` (or "done"); ``exit=True`` makes a blocking call end its
    process (``os._exit``) once released: a crash in the middle of a call.
    """

    def __init__(self, started: RayEvent, release: RayEvent) -> None:
        self._started = started
        self._release = release

    def __call__(self, request: Any, block: bool = False, i: Any = None, exit: bool = False) -> Any:
        if block:
            self._started.set()
            self._release.wait()
            if exit:
                os._exit(3)
        return "done" if i is None else i


def blocker_backend(srv: Any, config: Any = None, tag: str = "blk:v1") -> tuple[Any, RayEvent, RayEvent]:
    """Endpoint "blk" served by a :class:`Blocker`; returns its handle and the two events."""
    started, release = RayEvent(), RayEvent()
    srv.create_endpoint("blk", None)
    srv.create_backend(Blocker, tag, started, release, backend_config=config)
    srv.link("blk", tag)
    return srv.get_handle("blk"), started, release


def behind_a_blocked_call(handle: Any, started: RayEvent, values: Iterable[Any], **block: Any) -> list[Any]:
    """One call that blocks the replica (it has started when this returns), then one call per value."""
    futures = [handle.remote(block=True, **block)]
    assert started.wait(WAIT), "the blocking call did not start"
    return futures + [handle.remote(i=i) for i in values]


class RayEvent:
    """A ``threading.Event`` look-alike that works inside Ray actors (a tiny async actor holds it).

    It pickles (with its actor handle) into backends on the ray executor, so tests can
    hold a replica in the middle of a call and release it, without sleeping.
    """

    def __init__(self) -> None:
        import ray

        self._actor: Any = ray.remote(num_cpus=0)(_EventActor).remote()

    def set(self) -> None:
        import ray

        ray.get(self._actor.set.remote())

    def is_set(self) -> bool:
        import ray

        return bool(ray.get(self._actor.is_set.remote()))

    def wait(self, timeout: float | None = None) -> bool:
        import ray

        try:
            return bool(ray.get(self._actor.wait.remote(), timeout=timeout))
        except ray.exceptions.GetTimeoutError:
            return False


class _EventActor:
    def __init__(self) -> None:
        import asyncio

        self._event = asyncio.Event()

    async def wait(self) -> bool:
        await self._event.wait()
        return True

    async def set(self) -> None:
        self._event.set()

    async def is_set(self) -> bool:
        return self._event.is_set()

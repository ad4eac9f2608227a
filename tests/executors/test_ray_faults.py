"""Faults on the Ray executor: what the calls a dead actor held get, the warm spare that
replaces it, and no Ray process outliving a parent killed by SIGKILL."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from serve_core import BackendConfig, ReplicaDiedError, Serve
from serve_core.errors import NotDeliveredError

from ..conftest import WAIT, require
from ..procs import describe_processes, wait_until
from ..ray_fixtures import (
    LOCAL_RAY,
    RayEvent,
    behind_a_blocked_call,
    blocker_backend,
    kill_survivors,
    ray_cluster_fixture,  # noqa: F401 - the ray_cluster fixture
    ray_missing_reason,
    replica_actor_names,
    serve_actor_names,
    session_processes,
)

pytestmark = pytest.mark.ray

MakeServe = Callable[..., Serve]

KILLS = ["ray.kill", "SIGKILL", "crash"]  # from Ray, from outside, and the running call ending its process


class Gated:
    """``gate=k`` calls set ``started[k]``, wait for ``release[k]``, then return ``i`` or end the
    process (``exit=True``); ``seconds`` of work make a call outlast a reply slice."""

    def __init__(self, started: list[RayEvent], release: list[RayEvent]) -> None:
        self._started = started
        self._release = release

    def __call__(
        self, request: Any, i: Any = None, gate: int | None = None, exit: bool = False, seconds: float = 0
    ) -> Any:
        if gate is not None:
            self._started[gate].set()
            self._release[gate].wait()
            if exit:
                os._exit(3)
        if seconds:
            threading.Event().wait(seconds)  # work that takes this long (not synchronisation)
        return i


def _gated(srv: Serve, gates: int, config: BackendConfig | None = None) -> tuple[Any, list[RayEvent], list[RayEvent]]:
    started, release = [RayEvent() for _ in range(gates)], [RayEvent() for _ in range(gates)]
    srv.create_endpoint("g", None)
    srv.create_backend(Gated, "g:v1", started, release, backend_config=config)
    srv.link("g", "g:v1")
    return srv.get_handle("g"), started, release


def _kill(ray: Any, replica: Any, how: str, release: RayEvent) -> None:
    if how == "ray.kill":
        ray.kill(replica.actor)
    elif how == "SIGKILL":
        os.kill(replica.pid, signal.SIGKILL)
    else:
        release.set()  # the running call was made with exit=True


def _ray_replicas(srv: Serve, tag: str) -> list[Any]:
    return srv.replicas(tag)  # RayReplicas: the Replica protocol has no actor, pid...


def _replacement(srv: Serve, tag: str, victim: Any) -> Any:
    assert wait_until(lambda: [r for r in srv.replicas(tag) if r is not victim and r.alive], WAIT)
    (replacement,) = srv.replicas(tag)
    return replacement


# ------------------------------------------------------------- the calls it held
@pytest.mark.parametrize("how", KILLS)
@pytest.mark.parametrize("config", [None, BackendConfig(max_concurrent_queries=1)], ids=["32 held", "1 held"])
def test_a_dead_actor_fails_only_its_running_call_and_the_rest_run_on_its_replacement(
    ray_local: Any, make_serve: MakeServe, how: str, config: BackendConfig | None
) -> None:
    srv = make_serve(executor="ray")
    handle, started, release = blocker_backend(srv, config)
    # Held by default: one call in the actor's mailbox, four in the replica's outbox.
    futures = behind_a_blocked_call(handle, started, range(1, 6), exit=how == "crash")
    (victim,) = _ray_replicas(srv, "blk:v1")
    _kill(ray_local, victim, how, release)
    with pytest.raises(ReplicaDiedError, match="died during the call") as info:
        futures[0].result(WAIT)
    assert not isinstance(info.value, NotDeliveredError)
    assert [f.result(WAIT) for f in futures[1:]] == [1, 2, 3, 4, 5]
    assert srv.stat()["blk:v1_error_counter"] == 1
    replacement = _replacement(srv, "blk:v1", victim)
    assert not victim.alive and replacement.pid != victim.pid
    release.set()


@pytest.mark.parametrize("how", KILLS)
def test_calls_behind_the_running_one_in_the_same_actor_call_go_back_to_the_queue(
    ray_local: Any, make_serve: MakeServe, how: str
) -> None:
    srv = make_serve(executor="ray")
    handle, started, release = _gated(srv, 2)
    first = [handle.remote(gate=0), handle.remote(i=1)]  # the second waits in the actor's mailbox
    assert started[0].wait(WAIT)
    running = handle.remote(gate=1, exit=how == "crash")
    behind = [handle.remote(i=i) for i in range(3, 7)]
    (victim,) = _ray_replicas(srv, "g:v1")
    release[0].set()  # the outbox leaves as one actor call: the gate-1 call, then four others
    assert [f.result(WAIT) for f in first] == [None, 1]
    assert started[1].wait(WAIT)
    assert victim.actor_calls == 3
    _kill(ray_local, victim, how, release[1])
    with pytest.raises(ReplicaDiedError, match="died during the call"):
        running.result(WAIT)
    assert [f.result(WAIT) for f in behind] == [3, 4, 5, 6]
    assert srv.stat()["g:v1_error_counter"] == 1
    release[1].set()


def test_answers_leave_the_actor_a_slice_at_a_time_and_a_crash_keeps_them(
    ray_local: Any, make_serve: MakeServe
) -> None:
    srv = make_serve(executor="ray")
    handle, started, release = _gated(srv, 2)
    blocked = handle.remote(gate=0)
    assert started[0].wait(WAIT)
    mailbox = handle.remote(i=0)
    # One actor call: two calls longer than a reply slice, the crashing one, and one behind it.
    slow = [handle.remote(i=i, seconds=0.02) for i in (1, 2)]
    crash = handle.remote(gate=1, exit=True)
    behind = handle.remote(i=4)
    release[0].set()
    assert (blocked.result(WAIT), mailbox.result(WAIT)) == (None, 0)
    assert started[1].wait(WAIT)
    assert [f.result(WAIT) for f in slow] == [1, 2]  # answered while the gate-1 call still runs
    release[1].set()
    with pytest.raises(ReplicaDiedError, match="died during the call"):
        crash.result(WAIT)
    assert behind.result(WAIT) == 4


# ------------------------------------------------------------ the replica itself
def _replica(ray: Any, executor: Any, gates: int) -> tuple[Any, list[RayEvent], list[RayEvent]]:
    from serve_core.executors.base import ReplicaSpec

    started, release = [RayEvent() for _ in range(gates)], [RayEvent() for _ in range(gates)]
    spec = ReplicaSpec("g", "g#1", Gated, (started, release), BackendConfig())
    return executor.start_replica(spec), started, release


def _call(**kwargs: Any) -> Any:
    from serve_core.executors.base import Call

    return Call(method="__call__", web=False, batched=False, requests=(None,), kwargs=(kwargs,))


def _error(future: Any) -> BaseException | None:
    return future.exception(WAIT)


@pytest.mark.parametrize("end", ["killed", "stopped"])
def test_each_held_call_gets_what_the_actors_progress_says(ray_local: Any, end: str) -> None:
    from serve_core.executors.ray import RayExecutor

    executor = RayExecutor(warm_spare=False)
    try:
        replica, started, release = _replica(ray_local, executor, 1)
        running = replica.submit(_call(gate=0))
        assert started[0].wait(WAIT)
        held = [replica.submit(_call(i=i)) for i in range(4)]  # one in the mailbox, three in the outbox
        if end == "killed":
            ray_local.kill(replica.actor)
        else:
            replica.stop(0)  # a drain time that is over: killed with its calls
        error = _error(running)
        assert isinstance(error, ReplicaDiedError) and not isinstance(error, NotDeliveredError)
        assert all(isinstance(_error(f), NotDeliveredError) for f in held)
        assert not os.path.exists(replica._host.progress_path)  # read, then removed
        release[0].set()
    finally:
        executor.shutdown()


def test_without_the_progress_file_every_call_the_actor_held_fails(ray_local: Any) -> None:
    from serve_core.executors.ray import RayExecutor

    executor = RayExecutor(warm_spare=False)
    try:
        replica, started, release = _replica(ray_local, executor, 1)
        running = replica.submit(_call(gate=0))
        assert started[0].wait(WAIT)
        mailbox, outbox = replica.submit(_call(i=1)), replica.submit(_call(i=2))
        os.unlink(replica._host.progress_path)
        ray_local.kill(replica.actor)
        for future in (running, mailbox):  # at most once: a call that may have run is not run again
            error = _error(future)
            assert isinstance(error, ReplicaDiedError) and not isinstance(error, NotDeliveredError)
            assert "unknown" in str(error)
        assert isinstance(_error(outbox), NotDeliveredError)  # it never left
        release[0].set()
    finally:
        executor.shutdown()


def test_stop_from_a_reply_callback_returns_at_once_and_the_call_out_still_finishes(ray_local: Any) -> None:
    from serve_core.executors.ray import RayExecutor

    executor = RayExecutor(warm_spare=False)
    replica, started, release = _replica(ray_local, executor, 1)
    stopped_on: list[str] = []
    stop_returned = threading.Event()

    def stop_from_callback(_: Any) -> None:
        replica.stop(None)  # no drain limit: it must not wait for the calls only this thread reads
        stopped_on.append(threading.current_thread().name)
        stop_returned.set()

    replica.submit(_call(gate=0)).add_done_callback(stop_from_callback)
    behind = replica.submit(_call(i=2))  # sent too: the first call cannot end before release
    assert started[0].wait(WAIT)
    release[0].set()
    assert stop_returned.wait(WAIT) and stopped_on == [f"serve_core-ray-{replica.replica_id}"]
    assert behind.result(WAIT)[0].value == 2  # drained, not killed
    replica._reader.join(WAIT)
    assert not replica._reader.is_alive()
    prefix = executor.actor_name_prefix
    assert wait_until(lambda: not serve_actor_names(ray_local, prefix), WAIT), "the actor was not killed"
    executor.shutdown()


_SHUT_DOWN_UNDER_A_CALL = """
import pathlib, sys, threading
import ray
from serve_core import ReplicaDiedError, Serve

started = pathlib.Path(sys.argv[1])

def slow(request):
    started.touch()
    threading.Event().wait(60)

ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
srv = Serve(executor="ray", start_server=False)
srv.create_endpoint("slow", None)
srv.create_backend(slow, "slow:v1")
srv.link("slow", "slow:v1")
handle = srv.get_handle("slow")
futures = [handle.remote() for _ in range(3)]  # two actor calls out, one call in the outbox
pause = threading.Event()
for _ in range(500):
    if started.exists():
        break
    pause.wait(0.02)
assert started.exists(), "the call did not start"
ray.shutdown()
for future in futures:
    try:
        future.result(20)
    except ReplicaDiedError:
        pass
    else:
        raise AssertionError("a call did not fail")
srv.shutdown()
assert not ray.is_initialized(), "replacing the replica started a new Ray"
assert not [t.name for t in threading.enumerate() if t.name.startswith("serve_core")], "a reader thread is left"
"""


def test_ray_shut_down_under_running_calls_fails_them_and_starts_no_new_ray(ray_local: Any, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _SHUT_DOWN_UNDER_A_CALL, str(tmp_path / "started")],
        env=_child_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]


# -------------------------------------------------------------------- warm spare
def test_a_replacement_is_built_in_the_warm_spare_and_a_call_to_the_dead_actor_runs_there(
    ray_local: Any, make_serve: MakeServe
) -> None:
    srv = make_serve(executor="ray")
    handle, started, release = blocker_backend(srv)
    executor: Any = srv.executor("ray")
    (spare,) = executor.spares
    (victim,) = _ray_replicas(srv, "blk:v1")
    from serve_core.executors.ray_progress import process_started_at

    ray_local.kill(victim.actor)
    # ray.kill returns before the actor is dead: a call that reached it still would run there.
    assert wait_until(lambda: not process_started_at(victim.pid), WAIT), "the actor's process did not end"
    # Idle, its death is seen by the next call: sent to the dead actor, it never started there.
    assert handle.remote(i=1).result(WAIT) == 1
    assert replica_actor_names(srv, "blk:v1") == [spare]
    assert srv.stat()["blk:v1_error_counter"] == 0
    assert len(executor.spares) == 1 and executor.spares != [spare]
    release.set()


def test_a_spare_is_kept_only_for_replicas_that_reserve_nothing(ray_local: Any, make_serve: MakeServe) -> None:
    from serve_core.executors.ray import spare_options

    assert spare_options({}) == {"num_cpus": 0}
    assert spare_options({"num_cpus": 0, "num_gpus": 0}) == {"num_cpus": 0, "num_gpus": 0}
    for options in ({"num_cpus": 0.5}, {"num_gpus": 1}, {"memory": 10**6}, {"resources": {"x": 1}}):
        assert spare_options(options) is None
    srv = make_serve(executor="ray")
    srv.create_endpoint("e", None)
    srv.create_backend(Gated, "e:v1", [], [], backend_config=BackendConfig(num_cpus=0.5))
    assert srv.executor("ray").spares == []  # type: ignore[attr-defined]


def test_no_spare_when_told(ray_local: Any, make_serve: MakeServe) -> None:
    from serve_core.executors.ray import RayExecutor

    srv = make_serve(executor=RayExecutor(warm_spare=False))
    srv.create_endpoint("e", None)
    srv.create_backend(Gated, "e:v1", [], [])
    assert srv.executor("ray").spares == []  # type: ignore[attr-defined]


# ----------------------------------------------------------- on another node
def test_a_dead_actors_progress_is_read_on_its_own_node(ray_cluster: Any, make_serve: MakeServe) -> None:
    import ray

    ray_cluster.add_node(num_cpus=1, resources={"special": 1})
    ray_cluster.wait_for_nodes()
    connect = {k: v for k, v in LOCAL_RAY.items() if k in ("log_to_driver", "configure_logging")}
    srv = make_serve(executor="ray", ray_init_kwargs={"address": ray_cluster.address, **connect})
    handle, started, release = _gated(srv, 1, BackendConfig(num_cpus=0.25, resources={"special": 0.25}))
    futures = [handle.remote(gate=0)]
    assert started[0].wait(WAIT)
    futures += [handle.remote(i=i) for i in range(1, 4)]
    (victim,) = _ray_replicas(srv, "g:v1")
    assert not victim._local  # its progress file is on the other node
    ray.kill(victim.actor)
    with pytest.raises(ReplicaDiedError, match="died during the call"):
        futures[0].result(WAIT)
    assert [f.result(WAIT) for f in futures[1:]] == [1, 2, 3]
    release[0].set()
    srv.shutdown()


# ----------------------------------------------------- no orphans after SIGKILL
ORPHAN_BOUND_S = 10.0  # what the executor promises: no Ray process it started outlives it longer
START_TIMEOUT_S = 120.0  # a subprocess starting Ray and a replica, on the busy 2-core machine

_SERVE_AND_WAIT = """
import os, pathlib, sys, threading
from serve_core import Serve

srv = Serve(executor="ray", start_server=False)
srv.create_endpoint("e", None)
srv.create_backend(lambda request=None: os.getpid(), "e:v1")
srv.link("e", "e:v1")
srv.get_handle("e").remote().result(120)
pathlib.Path(sys.argv[1]).write_text(str(srv.executor("ray").watchdog_pid))
if sys.argv[2] == "shutdown":
    srv.shutdown()
else:
    threading.Event().wait()
"""


def _child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return {**env, **extra}


@pytest.mark.parametrize("end", ["SIGKILL", "shutdown"])
def test_no_ray_process_outlives_its_parent(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, end: str
) -> None:
    require(importlib.util.find_spec("ray") is not None, ray_missing_reason())
    temp_root = tmp_path_factory.mktemp("rk")  # short: Ray's socket paths under it must fit in 107 bytes
    ready = tmp_path / "watchdog-pid"
    with open(tmp_path / "child.log", "wb") as log:
        child = subprocess.Popen(
            [sys.executable, "-c", _SERVE_AND_WAIT, str(ready), end],
            env=_child_env(RAY_TMPDIR=str(temp_root)), stdout=log, stderr=subprocess.STDOUT,
        )
    session: dict[int, str] = {}
    try:
        assert wait_until(lambda: ready.exists() and ready.read_text() or child.poll() is not None, START_TIMEOUT_S)
        assert ready.exists(), (tmp_path / "child.log").read_text()[-3000:]
        session = session_processes(temp_root)
        commands = "\n".join(describe_processes(set(session)))
        assert int(ready.read_text()) in session and "raylet" in commands, commands
        if end == "SIGKILL":
            child.kill()
        child.wait(START_TIMEOUT_S)
        gone = wait_until(lambda: not session_processes(temp_root), ORPHAN_BOUND_S)
        left = session_processes(temp_root)
        assert gone, f"alive {ORPHAN_BOUND_S:g} s after their parent ended: {describe_processes(set(left))}"
        assert child.returncode == (-signal.SIGKILL if end == "SIGKILL" else 0)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        kill_survivors({**session, **session_processes(temp_root)})  # never another session's

"""The Ray executor on a local Ray (shared, 2 CPUs), on a two-node cluster on this machine, and
beside a cluster that someone else started with ``ray start``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from werkzeug.test import Client

import serve_core as serve
from serve_core import BackendConfig, ReplicaDiedError, Serve, ServeError

from ..conftest import WAIT, require
from ..ray_fixtures import (
    LOCAL_RAY,
    ForeignRay,
    behind_a_blocked_call,
    blocker_backend,
    ray_cluster_fixture,  # noqa: F401 - the ray_cluster fixture
    replica_actor_names,
    serve_actor_names,
    start_local_ray,
)

pytestmark = pytest.mark.ray

MakeServe = Callable[..., Serve]


def _replicas(srv: Serve, tag: str) -> list[Any]:
    return srv.replicas(tag)


def _actor_name_prefix(srv: Serve, config: BackendConfig) -> str:
    executor: Any = srv.executor(config.executor)  # a RayExecutor: the Executor protocol has no prefix
    return executor.actor_name_prefix


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` with a bounded timeout (Ray updates its actor table asynchronously)."""
    done = threading.Event()
    for _ in range(int(WAIT / 0.05)):
        if condition():
            return
        done.wait(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _python_call(srv: Serve, endpoint: str, **kwargs: Any) -> Any:
    return srv.get_handle(endpoint).remote(**kwargs).result(WAIT)


# ------------------------------------------------------------------ optional dependency
def test_import_serve_core_does_not_import_ray() -> None:
    code = (
        "import sys, serve_core\n"
        "s = serve_core.Serve(start_server=False)\n"
        "s.shutdown()\n"
        "assert 'ray' not in sys.modules, 'serve_core imported ray'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_actor_options_leave_out_unset_fields(ray_local: Any) -> None:
    from serve_core.executors.ray import actor_options

    assert actor_options(BackendConfig()) == {}
    config = BackendConfig(
        num_cpus=0.5, num_gpus=0, memory=1e6, resources={"special": 1}, object_store_memory=5
    )
    expected = {"num_cpus": 0.5, "num_gpus": 0, "memory": 1_000_000, "resources": {"special": 1}}
    assert actor_options(config) == expected


# ------------------------------------------------------------------------ calling
class WhoAmI:
    def __call__(self, request: Any) -> tuple[str | None, int]:
        import ray

        return ray.get_runtime_context().get_actor_id(), os.getpid()


def test_two_replicas_are_two_actors(ray_local: Any, make_serve: MakeServe) -> None:
    srv = make_serve(executor="ray")
    srv.create_endpoint("who", None)
    srv.create_backend(WhoAmI, "who:v1", backend_config=BackendConfig(num_replicas=2))
    srv.link("who", "who:v1")
    handles = {replica.actor._actor_id.hex() for replica in _replicas(srv, "who:v1")}
    seen = {_python_call(srv, "who") for _ in range(10)}
    assert len(handles) == 2
    assert {actor for actor, _ in seen} == handles
    assert len({pid for _, pid in seen}) == 2
    assert all(pid != os.getpid() for _, pid in seen)


def echo_context(request: Any, x: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"web": serve.context.web, "batch_size": serve.context.batch_size, "x": x}
    if serve.context.web:
        out.update(path=request.path, arg=request.args.get("a"), body=request.get_data(as_text=True))
        out["tag"] = request.headers["X-Tag"]
    return out


def test_context_and_web_request_inside_the_actor(ray_local: Any, make_serve: MakeServe) -> None:
    srv = make_serve(executor="ray")
    srv.create_endpoint("ctx", "/ctx", methods=["GET", "POST"])
    srv.create_backend(echo_context, "ctx:v1")
    srv.link("ctx", "ctx:v1")
    assert _python_call(srv, "ctx", x=3) == {"web": False, "batch_size": None, "x": 3}
    reply = Client(srv.wsgi_app()).post("/ctx?a=1", data=b"payload", headers={"X-Tag": "t"})
    web = {"path": "/ctx", "arg": "1", "body": "payload", "tag": "t"}
    assert reply.get_json() == {"web": True, "batch_size": None, "x": 0, **web}


@serve.accept_batch
def batched(request: Any, x: list[int]) -> list[tuple[int, int | None]]:
    return [(value * 2, serve.context.batch_size) for value in x]


def test_a_batch_is_one_actor_call(ray_local: Any, make_serve: MakeServe) -> None:
    srv = make_serve(executor="ray")
    srv.create_endpoint("b", None)
    srv.create_backend(batched, "b:v1", backend_config=BackendConfig(max_batch_size=4))
    srv.link("b", "b:v1")
    handle = srv.get_handle("b")
    futures = [handle.remote(x=i) for i in range(12)]
    results = [f.result(WAIT) for f in futures]
    assert [value for value, _ in results] == [i * 2 for i in range(12)]
    assert all(1 <= size <= 4 for _, size in results)


def test_per_backend_executor_on_a_thread_default_instance(ray_local: Any, make_serve: MakeServe) -> None:
    srv = make_serve(executor="thread")
    srv.create_endpoint("who", None)
    srv.create_backend(WhoAmI, "who:v1", backend_config=BackendConfig(executor="ray"))
    srv.link("who", "who:v1")
    _, pid = _python_call(srv, "who")
    assert pid != os.getpid()


# -------------------------------------------------------------------------- errors
class CustomError(Exception):
    pass


class NeedsTwoArgs(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Tricky:
    def __call__(self, request: Any, kind: str = "ok", value: Any = None) -> Any:
        if kind == "raise":
            raise CustomError("boom")
        if kind == "lock":
            return threading.Lock()
        if kind == "unloadable":
            raise NeedsTwoArgs(7, "cannot be rebuilt by pickle")
        return value


def _tricky(srv: Serve) -> Any:
    srv.create_endpoint("t", None)
    srv.create_backend(Tricky, "t:v1")
    srv.link("t", "t:v1")
    return srv.get_handle("t")


def test_user_exception_keeps_its_type_and_remote_traceback(ray_local: Any, make_serve: MakeServe) -> None:
    handle = _tricky(make_serve(executor="ray"))
    with pytest.raises(CustomError, match="boom") as info:
        handle.remote(kind="raise").result(WAIT)
    assert 'raise CustomError("boom")' in str(info.value.__cause__)
    assert handle.remote(value=5).result(WAIT) == 5


@pytest.mark.parametrize("kind", ["lock", "unloadable"])
def test_untransferable_result_is_a_serve_error_and_the_replica_lives(
    ray_local: Any, make_serve: MakeServe, kind: str
) -> None:
    srv = make_serve(executor="ray")
    handle = _tricky(srv)
    (replica,) = _replicas(srv, "t:v1")
    with pytest.raises(ServeError, match="cannot be sent back") as info:
        handle.remote(kind=kind).result(WAIT)
    assert not isinstance(info.value, ReplicaDiedError)
    assert handle.remote(value="fine").result(WAIT) == "fine"
    assert _replicas(srv, "t:v1") == [replica]


def test_unpicklable_argument_fails_only_that_call(ray_local: Any, make_serve: MakeServe) -> None:
    srv = make_serve(executor="ray")
    handle = _tricky(srv)
    with pytest.raises(ServeError, match="could not be sent"):
        handle.remote(value=threading.Lock()).result(WAIT)
    assert handle.remote(value=[1, 2]).result(WAIT) == [1, 2]


def test_plain_arguments_and_arguments_sent_by_value_both_arrive(ray_local: Any, make_serve: MakeServe) -> None:
    # Plain values travel through the C pickler, anything else through cloudpickle (a class
    # defined here exists only in this process: it must travel by value).
    class Here:
        def __init__(self, x: int) -> None:
            self.x = x

        def __eq__(self, other: object) -> bool:
            return type(other).__name__ == "Here" and getattr(other, "x", None) == self.x

    handle = _tricky(make_serve(executor="ray"))
    plain = [None, True, 7, 2.5, "text", b"\x00bytes"]
    for value in [*plain, Here(3), [Here(4)], {"k": (1, "two")}]:
        assert handle.remote(value=value).result(WAIT) == value
    futures = [handle.remote(value=value) for value in [*plain, Here(5)]]  # coalesced into one message
    assert [f.result(WAIT) for f in futures] == [*plain, Here(5)]


def test_large_results_come_back_also_when_coalesced(ray_local: Any, make_serve: MakeServe) -> None:
    # Replies this large go through Ray's shared object store (they once aborted the driver).
    srv = make_serve(executor="ray")
    srv.create_endpoint("big", None)
    srv.create_backend(lambda *, n: b"x" * n, "big:v1")
    srv.link("big", "big:v1")
    handle = srv.get_handle("big")
    assert len(handle.remote(n=300_000).result(WAIT)) == 300_000
    futures = [handle.remote(n=20_000) for _ in range(64)]  # dozens of calls per actor call
    assert all(len(f.result(WAIT)) == 20_000 for f in futures)


def test_an_object_ref_argument_reaches_the_backend(ray_local: Any, make_serve: MakeServe) -> None:
    srv = make_serve(executor="ray")
    srv.create_endpoint("deref", None)
    srv.create_backend(lambda *, ref: ray_local.get(ref) + 1, "deref:v1")
    srv.link("deref", "deref:v1")
    assert srv.get_handle("deref").remote(ref=ray_local.put(41)).result(WAIT) == 42


def test_an_argument_the_actor_cannot_load_fails_only_its_call(
    ray_local: Any, make_serve: MakeServe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sc_driver_only.py").write_text("class OnlyHere:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # the actor's process never sees this folder
    import sc_driver_only

    srv = make_serve(executor="ray")
    handle, started, release = blocker_backend(srv)
    blocked = handle.remote(block=True)
    assert started.wait(WAIT)
    before, bad, after = handle.remote(i=1), handle.remote(i=sc_driver_only.OnlyHere()), handle.remote(i=2)
    release.set()  # the three leave together, as one actor call
    with pytest.raises(ServeError, match="could not read the call"):
        bad.result(WAIT)
    assert [f.result(WAIT) for f in (blocked, before, after)] == ["done", 1, 2]


class FailingInit:
    def __init__(self, flag: str) -> None:
        raise ValueError(f"bad flag {flag}")

    def __call__(self, request: Any) -> None:
        return None


def test_constructor_error_reaches_create_backend(ray_local: Any, make_serve: MakeServe) -> None:
    srv = make_serve(executor="ray")
    with pytest.raises(ValueError, match="bad flag x"):
        srv.create_backend(FailingInit, "f:v1", "x")
    prefix = _actor_name_prefix(srv, BackendConfig(executor="ray"))
    _wait_until(lambda: not serve_actor_names(ray_local, prefix), "the failed actor to go away")


def test_unplaceable_replica_fails_with_a_clear_error(ray_local: Any, make_serve: MakeServe) -> None:
    from serve_core.executors.ray import RayExecutor

    srv = make_serve(executor=RayExecutor(start_timeout_s=0.5))
    with pytest.raises(ServeError, match="nowhere"):
        srv.create_backend(WhoAmI, "w:v1", backend_config=BackendConfig(resources={"nowhere": 1}))


# ---------------------------------------------------------------------- coalescing
def test_ray_replicas_hold_the_executor_default_number_of_calls(ray_local: Any, make_serve: MakeServe) -> None:
    from serve_core.executors.ray import DEFAULT_MAX_CONCURRENT_QUERIES

    srv = make_serve(executor="ray")
    handle, started, release = blocker_backend(srv)
    assert srv.get_backend_config("blk:v1").max_concurrent_queries is None  # left to the executor
    futures = behind_a_blocked_call(handle, started, range(1, DEFAULT_MAX_CONCURRENT_QUERIES + 1))
    assert srv.stat()["backend_blk:v1_queue_size"] == 1  # one more waits in the router's queue
    release.set()
    assert [f.result(WAIT) for f in futures] == ["done", *range(1, DEFAULT_MAX_CONCURRENT_QUERIES + 1)]


def test_calls_sent_while_the_actor_is_busy_travel_as_one_actor_call(
    ray_local: Any, make_serve: MakeServe
) -> None:
    srv = make_serve(executor="ray")
    handle, started, release = blocker_backend(srv, BackendConfig(max_concurrent_queries=12))
    futures = behind_a_blocked_call(handle, started, range(1, 12))
    (replica,) = _replicas(srv, "blk:v1")
    assert replica.actor_calls == 2  # the blocked call and the next; ten wait in the outbox
    release.set()
    assert [f.result(WAIT) for f in futures] == ["done", *range(1, 12)]  # run in the order sent
    assert replica.actor_calls == 3  # the ten left together


def test_unpicklable_argument_among_coalesced_calls_fails_only_that_call(
    ray_local: Any, make_serve: MakeServe
) -> None:
    srv = make_serve(executor="ray")
    handle, started, release = blocker_backend(srv)
    blocked = handle.remote(block=True)
    assert started.wait(WAIT)
    before, after = handle.remote(i=1), handle.remote(i=2)
    bad = handle.remote(i=threading.Lock())
    last = handle.remote(i=3)
    release.set()
    with pytest.raises(ServeError, match="could not be sent"):
        bad.result(WAIT)
    assert [f.result(WAIT) for f in (blocked, before, after, last)] == ["done", 1, 2, 3]


def test_scale_down_drains_the_call_in_flight(ray_local: Any, make_serve: MakeServe) -> None:
    srv = make_serve(executor="ray")
    handle, started, release = blocker_backend(srv, BackendConfig(num_replicas=2))
    in_flight = [handle.remote(block=True) for _ in range(2)]  # one call on each replica
    assert started.wait(WAIT)
    config = srv.get_backend_config("blk:v1")
    config.num_replicas = 1
    scaler = threading.Thread(target=srv.set_backend_config, args=("blk:v1", config))
    scaler.start()
    release.set()
    scaler.join(WAIT)
    assert [f.result(WAIT) for f in in_flight] == ["done", "done"]
    assert len(_replicas(srv, "blk:v1")) == 1


def test_locally_defined_exception_keeps_its_class(ray_local: Any, make_serve: MakeServe) -> None:
    class LocalError(Exception):
        pass

    def backend(request: Any) -> None:
        raise LocalError("local")

    srv = make_serve(executor="ray")
    srv.create_endpoint("loc", None)
    srv.create_backend(backend, "loc:v1")
    srv.link("loc", "loc:v1")
    with pytest.raises(LocalError, match="local"):
        srv.get_handle("loc").remote().result(WAIT)


# ---------------------------------------------------------------------- lifecycle
def test_shutdown_kills_its_actors_and_leaves_ray_running(ray_local: Any, make_serve: MakeServe) -> None:
    srv = make_serve(executor="ray")
    srv.create_endpoint("who", None)
    srv.create_backend(WhoAmI, "who:v1", backend_config=BackendConfig(num_replicas=2))
    srv.link("who", "who:v1")
    prefix = _actor_name_prefix(srv, srv.get_backend_config("who:v1"))
    assert len(replica_actor_names(srv, "who:v1")) == 2
    _wait_until(lambda: len(serve_actor_names(ray_local, prefix)) == 3, "the warm spare")  # two replicas, one spare
    srv.shutdown()
    _wait_until(lambda: not serve_actor_names(ray_local, prefix), "serve actors to be gone")
    assert ray_local.is_initialized()


def test_placement_change_replaces_replicas_one_by_one(ray_local: Any, make_serve: MakeServe) -> None:
    srv = make_serve(executor="ray")
    srv.create_endpoint("who", None)
    srv.create_backend(WhoAmI, "who:v1", backend_config=BackendConfig(num_replicas=2))
    srv.link("who", "who:v1")
    old = _replicas(srv, "who:v1")
    handle = srv.get_handle("who")
    counts: list[int] = []
    executor: Any = srv.executor("ray")
    original_start = executor.start_replica

    def start_and_count(spec: Any) -> Any:
        counts.append(len(srv.replica_ids("who:v1")))  # replicas serving when a new one starts
        return original_start(spec)

    executor.start_replica = start_and_count
    config = srv.get_backend_config("who:v1")
    config.num_cpus = 0.25
    srv.set_backend_config("who:v1", config)
    new = _replicas(srv, "who:v1")
    assert counts == [2, 2]
    assert not set(old) & set(new) and not any(r.alive for r in old)
    assert len({handle.remote().result(WAIT)[0] for _ in range(6)}) == 2


# ------------------------------------------------------------------------ cluster
def test_custom_resource_places_replica_on_the_node_that_has_it(ray_cluster: Any, make_serve: MakeServe) -> None:
    import ray

    special = ray_cluster.add_node(num_cpus=1, resources={"special": 1})
    ray_cluster.wait_for_nodes()
    srv = make_serve(executor="ray", ray_init_kwargs={"address": ray_cluster.address, **_connect_kwargs()})
    srv.create_endpoint("here", None)
    # With a custom resource set, Ray holds 1 CPU per actor unless num_cpus says otherwise.
    config = BackendConfig(num_replicas=2, num_cpus=0.5, resources={"special": 0.5})
    srv.create_backend(node_of_replica, "here:v1", backend_config=config)
    srv.link("here", "here:v1")
    nodes = {srv.get_handle("here").remote().result(WAIT) for _ in range(6)}
    assert nodes == {special.node_id}
    srv.shutdown()
    assert not ray.is_initialized()  # this executor started (connected) Ray, so it stopped it


def node_of_replica(request: Any) -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


def _connect_kwargs() -> dict[str, Any]:
    return {k: v for k, v in LOCAL_RAY.items() if k in ("log_to_driver", "configure_logging")}


# ------------------------------------------------------- a cluster started by someone else
# On a machine where someone ran `ray start`, a bare `ray.init()` joins that cluster (and
# refuses num_cpus); RAY_ADDRESS does the same. Nothing of ours may join one unasked.
@pytest.mark.parametrize(
    ("kwargs", "ray_address", "expected"),
    [
        (None, None, {"include_dashboard": False, "address": "local"}),
        ({"num_cpus": 1}, None, {"num_cpus": 1, "address": "local"}),
        ({"address": None, "num_cpus": 1}, None, {"num_cpus": 1, "address": "local"}),
        (None, "", {"include_dashboard": False, "address": "local"}),  # Ray ignores an empty one too
        ({"address": "auto"}, None, {"address": "auto"}),
        ({"address": "10.1.2.3:6379"}, "head:6379", {"address": "10.1.2.3:6379"}),
        ({"address": "local"}, "head:6379", {"address": "local"}),
        (None, "head:6379", {"include_dashboard": False}),  # no address: Ray joins RAY_ADDRESS
    ],
)
def test_ray_init_arguments_start_a_local_ray_unless_told_to_join_one(
    kwargs: dict[str, Any] | None, ray_address: str | None, expected: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    require(importlib.util.find_spec("ray") is not None, "ray is not installed")
    from serve_core.executors.ray import DEFAULT_RAY_INIT_KWARGS, ray_init_arguments

    if ray_address is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", ray_address)
    given = None if kwargs is None else dict(kwargs)
    assert ray_init_arguments(given) == expected
    assert given == kwargs and DEFAULT_RAY_INIT_KWARGS == {"include_dashboard": False}


def _on_a_machine_with(cluster: ForeignRay, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Put this process where a bare ``ray.init()`` would join ``cluster``; returns ``ray``.

    The shared local Ray is shut down (the next test that needs it starts it again): an
    executor would use it rather than start or join one.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setenv("RAY_TMPDIR", str(cluster.temp_root))  # where cluster recorded its address
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="existing cluster"):  # the trap, as it was
        ray.init(num_cpus=1, include_dashboard=False)
    assert not ray.is_initialized()
    return ray


def _gcs_address(ray: Any) -> str:
    return str(ray.get_runtime_context().gcs_address)


def test_the_shared_local_ray_is_its_own_beside_a_foreign_cluster(
    foreign_ray: ForeignRay, monkeypatch: pytest.MonkeyPatch
) -> None:
    ray = _on_a_machine_with(foreign_ray, monkeypatch)
    try:
        start_local_ray()
        assert _gcs_address(ray) != foreign_ray.address
        assert ray.cluster_resources()["CPU"] == LOCAL_RAY["num_cpus"]
    finally:
        ray.shutdown()  # it lives under the foreign cluster's RAY_TMPDIR, which the test drops


@pytest.mark.parametrize("ray_init_kwargs", [None, {"num_cpus": 1, **_connect_kwargs()}], ids=["default", "num_cpus"])
def test_the_executor_starts_its_own_ray_beside_a_foreign_cluster(
    foreign_ray: ForeignRay, monkeypatch: pytest.MonkeyPatch, make_serve: MakeServe, ray_init_kwargs: Any
) -> None:
    ray = _on_a_machine_with(foreign_ray, monkeypatch)
    srv = make_serve(executor="ray", ray_init_kwargs=ray_init_kwargs)
    assert _gcs_address(ray) != foreign_ray.address
    if ray_init_kwargs is not None:
        assert ray.cluster_resources()["CPU"] == 1
    srv.create_endpoint("here", None)
    srv.create_backend(node_of_replica, "here:v1")
    srv.link("here", "here:v1")
    assert _python_call(srv, "here") == ray.get_runtime_context().get_node_id()
    srv.shutdown()
    assert not ray.is_initialized()  # it started that Ray, so it stopped it
    assert foreign_ray.process.poll() is None


@pytest.mark.parametrize("told_by", ["address", "auto", "RAY_ADDRESS"])
def test_the_executor_joins_a_foreign_cluster_when_told(
    foreign_ray: ForeignRay, monkeypatch: pytest.MonkeyPatch, make_serve: MakeServe, told_by: str
) -> None:
    ray = _on_a_machine_with(foreign_ray, monkeypatch)
    kwargs: dict[str, Any] | None = {"address": foreign_ray.address if told_by == "address" else "auto"}
    if told_by == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", foreign_ray.address)
        kwargs = None
    srv = make_serve(executor="ray", ray_init_kwargs=kwargs)
    assert _gcs_address(ray) == foreign_ray.address
    srv.create_endpoint("here", None)
    srv.create_backend(node_of_replica, "here:v1")
    srv.link("here", "here:v1")
    assert _python_call(srv, "here") == ray.get_runtime_context().get_node_id()
    srv.shutdown()
    assert not ray.is_initialized()  # disconnected; the cluster itself is not ours to stop
    assert foreign_ray.process.poll() is None


def test_an_explicit_address_wins_over_ray_address(foreign_ray: ForeignRay, monkeypatch: pytest.MonkeyPatch) -> None:
    from serve_core import ValidationError
    from serve_core.executors.ray import RayExecutor

    ray = _on_a_machine_with(foreign_ray, monkeypatch)
    monkeypatch.setenv("RAY_ADDRESS", foreign_ray.address)
    with pytest.raises(ValidationError, match="RAY_ADDRESS.*'address': 'local'"):
        RayExecutor(ray_init_kwargs={"num_cpus": 1})  # only a new local Ray takes num_cpus
    assert not ray.is_initialized()
    executor = RayExecutor(ray_init_kwargs={"address": "local", "num_cpus": 1, **_connect_kwargs()})
    try:
        assert _gcs_address(ray) != foreign_ray.address
    finally:
        executor.shutdown()
    assert not ray.is_initialized()

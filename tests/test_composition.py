"""Composition on every executor: handles as values, ``get_handle`` inside replicas, the loop-back rule.

Backends meant for worker processes and Ray actors are built inside functions, so cloudpickle
ships them by value (workers never import this module).
"""

from __future__ import annotations

import asyncio
import copy
import pickle
from collections.abc import Callable
from typing import Any

import pytest

import serve_core as serve
from serve_core import BackendConfig, DeadlineExceededError, LoopBackError, Serve, ServeStateError
from serve_core.composition import Origin, ReplicaScope, bind, check_chain
from serve_core.handle import StreamingHandle

from .conftest import WAIT


def model_backend() -> Any:
    class Model:
        """``__call__`` adds one, ``twice`` doubles, ``tag`` names the backend (set at construction)."""

        def __init__(self, tag: str = "model") -> None:
            self.tag = tag

        def __call__(self, *, x: int = 0) -> int:
            return x + 1

        def twice(self, *, x: int = 0) -> int:
            return 2 * x

        def name(self) -> str:
            return self.tag

    return Model


def pipeline_backend() -> Any:
    class Pipeline:
        """Calls the handle it was given; ``method`` forwards to the handle's method."""

        def __init__(self, model: serve.ServeHandle) -> None:
            self.model = model

        def __call__(self, *, x: int = 0) -> Any:
            return ("pipe", self.model.remote(x=x).result(WAIT))

        def twice(self, *, x: int = 0) -> Any:
            return self.model.options(method_name="twice").remote(x=x).result(WAIT)

        def named(self, *, key: str) -> Any:
            return self.model.options(method_name="name", shard_key=key).remote().result(WAIT)

        def late(self) -> str:
            try:
                self.model.options(absolute_slo_ms=1).remote().result(WAIT)  # a deadline long past
            except serve.DeadlineExceededError:
                return "deadline kept"
            return "deadline lost"

    return Pipeline


def inside_backend() -> Any:
    class Inside:
        """Asks for handles with ``serve.get_handle``: in its constructor, and in a call."""

        def __init__(self) -> None:
            self.model = serve.get_handle("model")

        def __call__(self, *, x: int = 0) -> Any:
            again = serve.get_handle("model").options(method_name="twice")
            return self.model.remote(x=x).result(WAIT), again.remote(x=x).result(WAIT)

    return Inside


def deploy_model(srv: Serve, **config: Any) -> serve.ServeHandle:
    srv.create_endpoint("model")
    srv.create_backend(model_backend(), "model:v1", backend_config=BackendConfig(**config))
    srv.link("model", "model:v1")
    return srv.get_handle("model")


def deploy(srv: Serve, name: str, target: Any, *init_args: Any, **config: Any) -> serve.ServeHandle:
    srv.create_endpoint(name)
    srv.create_backend(target, f"{name}:v1", *init_args, backend_config=BackendConfig(**config))
    srv.link(name, f"{name}:v1")
    return srv.get_handle(name)


# ------------------------------------------------------------------ handles as values
def test_a_handle_pickles_without_its_instance(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="inline")
    handle = deploy_model(srv).options(method_name="twice", relative_slo_ms=5000, shard_key="k")
    data = pickle.dumps(handle)
    assert b"RLock" not in data and len(data) < 400
    copied = pickle.loads(data)
    assert (copied.endpoint_name, copied.method_name, copied.slo, copied.shard_key, copied.instance_id) == (
        "model", "twice", handle.slo, "k", srv.instance_id
    )
    assert copied.remote(x=4).result(WAIT) == 8  # bound to the instance of that id in this process
    assert copy.deepcopy(handle) is handle and copy.copy(handle) is handle
    assert isinstance(pickle.loads(pickle.dumps(handle.options(stream=True))), StreamingHandle)


def test_an_unpickled_handle_without_its_instance_says_so(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="inline")
    handle = pickle.loads(pickle.dumps(deploy_model(srv)))
    srv.shutdown()  # its instance is gone, and there is no default instance
    with pytest.raises(ServeStateError, match="where that instance does not run"):
        handle.remote(x=1)
    with pytest.raises(ServeStateError):
        bind("no-such-instance", "model")


def test_the_default_instance_takes_handles_of_instances_not_here() -> None:
    srv = serve.init(start_server=False, executor="inline")
    try:
        deploy_model(srv)
        orphan = pickle.loads(pickle.dumps(srv.get_handle("model")).replace(
            srv.instance_id.encode(), b"x" * len(srv.instance_id)
        ))
        assert orphan.instance_id != srv.instance_id
        assert orphan.remote(x=1).result(WAIT) == 2
    finally:
        serve.shutdown()


# -------------------------------------------------------------- composition per executor
def test_a_handle_as_init_argument(srv: Serve) -> None:
    model = deploy_model(srv)
    pipe = deploy(srv, "pipe", pipeline_backend(), model)
    assert tuple(pipe.remote(x=1).result(WAIT)) == ("pipe", 2)
    assert pipe.options(method_name="twice").remote(x=5).result(WAIT) == 10  # method_name across the hop


def test_get_handle_inside_a_replica(srv: Serve) -> None:
    deploy_model(srv)
    inside = deploy(srv, "inside", inside_backend())
    assert tuple(inside.remote(x=3).result(WAIT)) == (4, 6)


def test_slo_and_shard_key_are_kept_across_the_hop(srv: Serve) -> None:
    srv.create_endpoint("model")
    for tag in ("a", "b"):
        srv.create_backend(model_backend(), tag, tag, backend_config=BackendConfig(drop_expired=True))
    srv.split("model", {"a": 0.5, "b": 0.5})
    pipe = deploy(srv, "pipe", pipeline_backend(), srv.get_handle("model"))
    assert pipe.options(method_name="late").remote().result(WAIT) == "deadline kept"
    keys = [f"key-{i}" for i in range(12)]
    direct = [srv.get_handle("model").options(method_name="name", shard_key=k).remote().result(WAIT) for k in keys]
    composed = [pipe.options(method_name="named").remote(key=k).result(WAIT) for k in keys]
    assert composed == direct and set(direct) == {"a", "b"}


def async_caller_backend() -> Any:
    async def caller(*, x: int = 0) -> Any:
        first, second = await asyncio.gather(
            serve.get_handle("model").remote(x=x), serve.get_handle("model").remote(x=x + 10)
        )
        return first, second

    return caller


def on(request: pytest.FixtureRequest, executor_name: str) -> str:
    """``executor_name``, with the shared local Ray started for ``"ray"``."""
    if executor_name == "ray":
        request.getfixturevalue("ray_local")
    return executor_name


@pytest.mark.parametrize("executor_name", ["inline", "thread", "process", "ray"])
def test_await_handle_remote_inside_an_async_replica(
    make_serve: Callable[..., Serve], request: pytest.FixtureRequest, executor_name: str
) -> None:
    srv = make_serve(executor=on(request, executor_name))
    deploy_model(srv, executor="thread")
    caller = deploy(srv, "caller", async_caller_backend())
    assert tuple(caller.remote(x=1).result(WAIT)) == (2, 12)


# ------------------------------------------------------------------------ the store
@pytest.mark.parametrize("executor_name", ["thread", "process", "ray"])
def test_composition_survives_a_restart_from_sqlite(
    make_serve: Callable[..., Serve], tmp_path: Any, request: pytest.FixtureRequest, executor_name: str
) -> None:
    path = f"sqlite:///{tmp_path / 'registry.db'}"
    first = make_serve(executor=on(request, executor_name), kv_store_path=path)
    deploy(first, "pipe", pipeline_backend(), deploy_model(first))
    deploy(first, "inside", inside_backend())
    assert tuple(first.get_handle("pipe").remote(x=1).result(WAIT)) == ("pipe", 2)
    first.shutdown()
    second = make_serve(executor=executor_name, kv_store_path=path)
    assert second.instance_id != first.instance_id
    assert sorted(second.restored.backends) == ["inside:v1", "model:v1", "pipe:v1"], second.restored
    assert tuple(second.get_handle("pipe").remote(x=1).result(WAIT)) == ("pipe", 2)
    assert tuple(second.get_handle("inside").remote(x=3).result(WAIT)) == (4, 6)


# ------------------------------------------------------------------- the loop-back rule
def looping_backend() -> Any:
    class Loop:
        """Calls its own endpoint ``depth`` times deep; ``relay`` goes through another endpoint first."""

        def __call__(self, *, depth: int = 1) -> Any:
            if depth == 0:
                return "bottom"
            try:
                return serve.get_handle("loop").remote(depth=depth - 1).result(WAIT)
            except serve.LoopBackError as exc:
                return f"refused: {exc}"

        def relay(self) -> Any:
            try:
                return serve.get_handle("relay").remote().result(WAIT)
            except serve.LoopBackError as exc:
                return f"refused: {exc}"

    return Loop


def relay_backend() -> Any:
    def relay() -> Any:
        return serve.get_handle("loop").remote(depth=0).result(WAIT)

    return relay


def test_a_backend_waiting_on_itself_is_refused(srv: Serve) -> None:
    loop = deploy(srv, "loop", looping_backend(), max_concurrent_queries=1)
    answer = loop.remote(depth=1).result(WAIT)
    assert answer.startswith("refused:") and "'loop:v1'" in answer and "loop:v1 -> loop:v1" not in answer


def test_a_longer_loop_back_is_refused(srv: Serve) -> None:
    loop = deploy(srv, "loop", looping_backend(), max_concurrent_queries=1)
    deploy(srv, "relay", relay_backend())
    answer = loop.options(method_name="relay").remote().result(WAIT)  # relay's call to loop is refused
    assert answer.startswith("refused:") and "chain loop:v1 -> relay:v1 " in answer


def test_a_loop_back_with_a_free_slot_runs(make_serve: Callable[..., Serve], concurrent_executor: str) -> None:
    srv = make_serve(executor=concurrent_executor)
    loop = deploy(srv, "loop", looping_backend(), num_replicas=2, max_concurrent_queries=1)
    assert loop.remote(depth=1).result(WAIT) == "bottom"
    assert loop.remote(depth=2).result(WAIT).startswith("refused:")  # the third level finds both slots held


def test_check_chain_counts_the_slots_the_chain_holds() -> None:
    check_chain("a", ("a", "b"), replicas=1, per_replica=2)
    check_chain("a", ("b",), replicas=1, per_replica=1)
    with pytest.raises(LoopBackError):
        check_chain("a", ("a", "b", "a"), replicas=2, per_replica=1)


def test_a_composed_call_inherits_the_callers_deadline(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="thread")
    deploy_model(srv, drop_expired=True)  # fails a call whose deadline passed
    pipe = deploy(srv, "pipe", pipeline_backend(), srv.get_handle("model"))  # runs expired calls (the default)
    with pytest.raises(DeadlineExceededError):
        pipe.options(absolute_slo_ms=1).remote(x=1).result(WAIT)  # its own call has no deadline: it inherits
    assert tuple(pipe.remote(x=1).result(WAIT)) == ("pipe", 2)


def test_origin_and_scope(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="inline")
    scope = ReplicaScope(srv, "a")
    assert scope.origin(None) == Origin(chain=("a",))
    deploy_model(srv)
    with pytest.raises(LoopBackError):
        srv.enqueue("model", origin=Origin(chain=("model:v1",)))
    assert srv.enqueue("model", kwargs={"x": 1}, origin=Origin(chain=("other",))).result(WAIT) == 2


# ------------------------------------------------------ threads of the backend, cancellation
def threaded_backend() -> Any:
    import threading

    def threaded(*, x: int = 0) -> Any:
        """Calls from a thread of its own (no call context there: the worker's or actor's scope)."""
        box: list[Any] = []
        worker = threading.Thread(target=lambda: box.append(serve.get_handle("model").remote(x=x).result(WAIT)))
        worker.start()
        worker.join(WAIT)
        return box[0]

    return threaded


@pytest.mark.parametrize("executor_name", ["process", "ray"])
def test_a_thread_the_backend_starts_reaches_the_instance(
    make_serve: Callable[..., Serve], request: pytest.FixtureRequest, executor_name: str
) -> None:
    """In a worker process or actor, the replica's scope is the process's (in this process a new
    thread does not inherit contextvars: run it in ``contextvars.copy_context()``, docs/composition.md)."""
    srv = make_serve(executor=on(request, executor_name))
    deploy_model(srv)
    assert deploy(srv, "threaded", threaded_backend()).remote(x=4).result(WAIT) == 5


def canceller_backend() -> Any:
    import concurrent.futures

    def canceller() -> str:
        """Cancels a composed call still queued behind a long one; reports what its future answered."""
        slow = serve.get_handle("slow")
        running = slow.remote()
        queued = slow.remote()
        queued.cancel()
        try:
            queued.result(WAIT)
        except concurrent.futures.CancelledError:
            outcome = "cancelled"
        else:
            outcome = "ran"
        running.cancel()
        return outcome

    return canceller


def slow_backend() -> Any:
    async def slow() -> str:
        await asyncio.sleep(WAIT)
        return "slept"

    return slow


def test_a_composed_call_can_be_cancelled(csrv: Serve) -> None:
    deploy(csrv, "slow", slow_backend())  # one call at a time: the second one waits in the queue
    assert deploy(csrv, "canceller", canceller_backend()).remote().result(WAIT) == "cancelled"


def test_a_serial_replica_runs_one_call_whatever_it_holds(srv: Serve) -> None:
    """A synchronous backend's replica runs what it holds one by one: waiting on itself is refused
    whatever its max_concurrent_queries (on Ray too, whose replicas hold 32 by default; an inline call
    to its own backend would only run once the outer one returned)."""
    loop = deploy(srv, "loop", looping_backend(), max_concurrent_queries=2)
    assert loop.remote(depth=1).result(WAIT).startswith("refused:")


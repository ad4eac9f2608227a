"""Convergence in one process: instances on a shared store, heartbeats on a fake clock, restarts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from serve_core import BackendConfig, Serve, ValidationError
from serve_core.kv.memory import MemoryKVStore
from serve_core.testing import FakeClock

from ..conftest import WAIT
from .backends import echo, make_shout
from .children import ROOT

MakeServe = Callable[..., Serve]


@pytest.fixture
def shared(make_serve: MakeServe) -> Callable[..., Serve]:
    """Instances on one memory store and one fake clock (their watchers do nothing until it moves)."""
    store, clock = MemoryKVStore("registry"), FakeClock()

    def build(**kwargs: object) -> Serve:
        return make_serve(kv_store_connector=lambda ns: store, executor="inline", clock=clock, **kwargs)

    build.clock = clock  # type: ignore[attr-defined]
    build.store = store  # type: ignore[attr-defined]
    return build


def test_an_instance_converges_on_what_another_committed(shared: Callable[..., Serve]) -> None:
    one, other = shared(), shared()
    one.create_endpoint("api", "/api")
    one.create_backend(echo, "echo:v1")
    one.create_backend(make_shout("!"), "shout:v1")
    one.split("api", {"echo:v1": 0.5, "shout:v1": 0.5})
    one.set_backend_config("echo:v1", BackendConfig(num_replicas=2))
    other.sync_registry()
    assert other.revision == one.revision
    assert other.route_table() == {"/api": ["api", ["GET"]]}
    assert other.get_traffic_policy("api") == {"echo:v1": 0.5, "shout:v1": 0.5}
    assert len(other.replica_ids("echo:v1")) == 2
    answers = {other.get_handle("api").remote(name="n").result(WAIT) for _ in range(40)}
    assert answers == {"echo n", "n!"}
    other.set_backend_config("echo:v1", BackendConfig(num_replicas=1))
    one.sync_registry()
    assert len(one.replica_ids("echo:v1")) == 1


def test_validation_uses_the_store_not_a_stale_copy(shared: Callable[..., Serve]) -> None:
    one, other = shared(), shared()
    one.create_endpoint("api", "/api")
    one.create_backend(echo, "echo:v1")
    # `other` has not converged yet, but its change is checked against the store: the backend exists
    other.link("api", "echo:v1")
    assert one.get_handle("api").remote(name="a").result(WAIT) == "echo a"
    from serve_core import ConflictError

    with pytest.raises(ConflictError, match="route '/api'"):
        other.create_endpoint("again", "/api")


def test_heartbeats_and_expiry_follow_the_clock(shared: Callable[..., Serve]) -> None:
    clock: FakeClock = shared.clock  # type: ignore[attr-defined]
    store: MemoryKVStore = shared.store  # type: ignore[attr-defined]
    one = shared(heartbeat_s=2.0, instance_expiry_s=10.0)
    record = one.instances()[0]
    assert (record.instance_id, record.pid, record.executor, record.http) == (
        one.instance_id, os.getpid(), "inline", None
    )
    dead = {**record.to_json(), "instance_id": "gone-1", "pid": 1}  # as a killed process left it
    store.update({"instance/gone-1": dead})
    assert {r.instance_id for r in one.instances()} == {one.instance_id, "gone-1"}
    clock.advance(1.0)
    one.sync_registry()  # no heartbeat due yet
    assert _last_seen(one) == record.last_seen
    clock.advance(1.0)
    one.sync_registry()
    assert _last_seen(one) == clock.wall() == record.last_seen + 2.0
    clock.advance(8.5)  # the dead one's record is now 10.5 s old
    assert [r.instance_id for r in one.instances()] == [one.instance_id]  # expired: no longer listed
    one.sync_registry()
    assert "instance/gone-1" not in store.as_dict()  # and swept from the store


def _last_seen(srv: Serve) -> float:
    return next(r.last_seen for r in srv.instances() if r.instance_id == srv.instance_id)


def test_a_shut_down_instance_removes_its_record(shared: Callable[..., Serve]) -> None:
    one, other = shared(), shared()
    other.shutdown()
    assert [r.instance_id for r in one.instances()] == [one.instance_id]


def test_sync_options_are_validated(make_serve: MakeServe) -> None:
    with pytest.raises(ValidationError, match="registry_poll_s"):
        make_serve(registry_poll_s=0)
    with pytest.raises(ValidationError, match="longer than heartbeat_s"):
        make_serve(heartbeat_s=5, instance_expiry_s=5)


def test_keep_store_state_keeps_runtime_changes_unless_the_code_changed(shared: Callable[..., Serve]) -> None:
    one = shared()
    one.create_endpoint("api")
    one.create_backend(echo, "echo:v1")
    one.create_backend(make_shout("!"), "shout:v1")
    one.link("api", "echo:v1")
    one.split("api", {"shout:v1": 1.0})  # an operator moved the traffic at runtime
    one.set_backend_config("echo:v1", BackendConfig(num_replicas=2))  # and scaled
    with one.keep_store_state() as notes:  # the deployment file runs again
        one.create_endpoint("api")
        one.create_backend(echo, "echo:v1", backend_config=BackendConfig(num_replicas=1))
        one.create_backend(make_shout("!"), "shout:v1")
        one.link("api", "echo:v1")
        one.create_backend(make_shout("?"), "new:v1")  # code the file writes now: its traffic applies
        one.create_endpoint("fresh")
        one.link("fresh", "new:v1")
    assert one.get_traffic_policy("api") == {"shout:v1": 1.0}
    assert one.get_backend_config("echo:v1").num_replicas == 2
    assert one.get_traffic_policy("fresh") == {"new:v1": 1.0}
    assert any("kept the stored traffic" in note for note in notes)
    assert any("kept the stored config" in note for note in notes)
    one.link("api", "echo:v1")  # outside the block, calls apply as always
    assert one.get_traffic_policy("api") == {"echo:v1": 1.0}


@pytest.mark.parametrize("name", [":memory:", "sqlite://"])
def test_an_in_memory_store_writes_no_file(
    name: str, make_serve: MakeServe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    srv = make_serve(kv_store_path=name)
    srv.create_endpoint("api")
    srv.create_backend(echo, "echo:v1")
    srv.link("api", "echo:v1")
    assert srv.get_handle("api").remote(name="m").result(WAIT) == "echo m"
    srv.shutdown()
    assert list(tmp_path.iterdir()) == []


def test_serve_core_run_on_memory_writes_no_file(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text("import serve_core as serve\nserve.create_endpoint('x', '/x')\n")
    done = subprocess.run(
        [sys.executable, "-m", "serve_core.cli", "deploy", "--kv-store", ":memory:", str(app)],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=3 * WAIT,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.py"]


MODULE = """
import serve_core as serve

srv = serve.init(kv_store_path={db!r}, start_server=False)


def hello(request=None):
    return "hello"


serve.create_endpoint("hello", "/hello")
serve.create_backend(hello, "hello:v1")
serve.link("hello", "hello:v1")
app = serve.wsgi_app()
"""

CHECK = """
import json, serve_core as serve
import deployment  # the module that calls init() and defines the backend it restores
srv = deployment.srv
print(json.dumps({
    "failed": srv.restored.failed,
    "deferred": srv.restored.deferred,
    "replicas": len(srv.replica_ids("hello:v1")),
    "num_replicas": srv.get_backend_config("hello:v1").num_replicas,
    "answer": serve.get_handle("hello").remote().result(10),
}))
serve.shutdown()
"""


def test_the_module_pattern_restarts_with_its_scaled_config(tmp_path: Path) -> None:
    (tmp_path / "deployment.py").write_text(textwrap.dedent(MODULE.format(db=str(tmp_path / "r.db"))))
    first = "import serve_core as serve, deployment\n" \
        "serve.set_backend_config('hello:v1', serve.BackendConfig(num_replicas=3))\nserve.shutdown()\n"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    for script in (first, CHECK):
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3 * WAIT
        )
        assert done.returncode == 0, done.stderr
        assert "partially initialized" not in done.stderr and "could not restore" not in done.stderr
    import json

    state = json.loads(done.stdout)
    assert state == {"failed": {}, "deferred": ["hello:v1"], "replicas": 3, "num_replicas": 3, "answer": "hello"}


def test_a_file_run_again_replays_its_own_steps_but_keeps_runtime_changes(shared: Callable[..., Serve]) -> None:
    """The file links, then splits: run again, it does the same, unless traffic was changed in between."""
    one = shared()

    def deployment_file() -> list[str]:
        with one.keep_store_state() as notes:
            one.create_endpoint("api")
            one.create_backend(echo, "echo:v1")
            one.link("api", "echo:v1")
            seen.append(one.get_traffic_policy("api"))
            one.create_backend(make_shout("!"), "shout:v1")
            one.split("api", {"echo:v1": 0.5, "shout:v1": 0.5})
        return notes

    seen: list[dict[str, float]] = []
    assert deployment_file() == []
    assert deployment_file() == []  # nothing changed since: its steps replay as the first time
    assert seen == [{"echo:v1": 1.0}, {"echo:v1": 1.0}]
    one.split("api", {"shout:v1": 1.0})  # at runtime
    notes = deployment_file()
    assert one.get_traffic_policy("api") == {"shout:v1": 1.0} and len(notes) == 2


def test_a_record_tampered_with_at_run_time_is_not_applied(shared: Callable[..., Serve]) -> None:
    store: MemoryKVStore = shared.store  # type: ignore[attr-defined]
    one = shared()
    one.create_endpoint("api")
    one.create_backend(echo, "echo:v1")
    one.link("api", "echo:v1")
    config = store.get("config/echo:v1")
    config["value"]["num_replicas"] = 5  # written behind serve_core's back, old signature kept
    store.update({"config/echo:v1": config, "meta/revision": store.get("meta/revision") + 1})
    one.sync_registry()
    assert len(one.replica_ids("echo:v1")) == 1  # the live re-read refused it
    assert one.get_handle("api").remote(name="t").result(WAIT) == "echo t"

"""One registry, many processes: changes made anywhere on a store reach every instance on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from serve_core import BackendConfig, Serve
from serve_core.kv.sql import SQLKVStore
from serve_core.persistence import RegistryStore

from ..conftest import WAIT
from ..net import free_port
from ..procs import wait_until
from .backends import Greeter, echo
from .children import ROOT, Child, run_together

MakeServe = Callable[..., Serve]
FAST_POLL = {"registry_poll_s": 0.05}


def _get(url: str) -> str:
    return requests.get(url, timeout=WAIT).text


def test_the_original_new_driver_scenario(store_url: str, spawn: Callable[..., Child], make_serve: MakeServe) -> None:
    """Ray 0.8's test_new_driver: a second driver registers and exits; the first one serves it."""
    first = make_serve(kv_store_path=store_url, start_server=True, http_port=0, blocking=True, **FAST_POLL)
    host, port = first.http_address() or ("", 0)
    second = spawn("driver", store_url)
    second.expect("DONE")
    assert second.proc.wait(timeout=WAIT) == 0
    assert wait_until(lambda: "/driver" in first.route_table(), WAIT)
    assert first.get_handle("driver", missing_ok=True).remote().result(WAIT) == "OK!"
    assert _get(f"http://{host}:{port}/driver") == "OK!"


def test_a_second_driver_on_the_taken_port_attaches(
    store_url: str, spawn: Callable[..., Child], make_serve: MakeServe
) -> None:
    first = make_serve(kv_store_path=store_url, start_server=True, http_port=0, blocking=True, **FAST_POLL)
    host, port = first.http_address() or ("", 0)
    second = spawn("driver", store_url, str(port))  # verbatim init() on the port the first one serves
    second.expect("DONE")
    assert second.proc.wait(timeout=WAIT) == 0
    assert "attaches to the store without an HTTP server" in second.log.read_text()
    assert wait_until(lambda: _get(f"http://{host}:{port}/driver") == "OK!", WAIT)


def test_routes_contested_by_two_processes_go_to_exactly_one(
    store_url: str, spawn: Callable[..., Child], make_serve: MakeServe
) -> None:
    count = 15
    won = [set(json.loads(line)) for line in run_together([spawn("race", store_url, p, str(count)) for p in "ab"])]
    assert won[0] | won[1] == set(range(count)) and not won[0] & won[1]  # each route exactly once
    srv = make_serve(kv_store_path=store_url, executor="inline")
    table = srv.route_table()
    assert sorted(table) == sorted(f"/race/{i}" for i in range(count))
    for i in range(count):
        assert table[f"/race/{i}"][0] == ("a" if i in won[0] else "b") + str(i)
    assert srv.revision == count  # one committed change per route; the losers wrote nothing


def test_changes_of_one_instance_reach_another_on_the_same_store(store_url: str, make_serve: MakeServe) -> None:
    one = make_serve(kv_store_path=store_url, **FAST_POLL)
    other = make_serve(kv_store_path=store_url, **FAST_POLL)
    one.create_endpoint("api", "/api")
    one.create_backend(Greeter, "greet:v1", "hello")
    one.create_backend(echo, "echo:v1")
    one.link("api", "greet:v1")
    assert wait_until(lambda: other.revision == one.revision, WAIT)
    handle = other.get_handle("api")
    assert handle.remote(name="x").result(WAIT) == ["hello x"]  # Greeter takes batches
    other.split("api", {"echo:v1": 1.0})  # and back the other way
    other.set_backend_config("greet:v1", BackendConfig(num_replicas=2))
    assert wait_until(lambda: one.revision == other.revision, WAIT)
    assert one.get_handle("api").remote(name="y").result(WAIT) == "echo y"
    assert len(one.replica_ids("greet:v1")) == 2
    records = {r.instance_id: r for r in one.instances()}
    assert set(records) == {one.instance_id, other.instance_id}


def test_postgres_notifies_without_waiting_for_a_poll(
    pg_url: str, make_serve: MakeServe, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVE_CORE_SECRET", "sharing-test-secret-0123")
    one = make_serve(kv_store_path=pg_url, registry_poll_s=3600)  # polls never come within the test
    other = make_serve(kv_store_path=pg_url, registry_poll_s=3600)
    one.create_endpoint("api", "/api")
    assert wait_until(lambda: "/api" in other.route_table(), WAIT)  # LISTEN/NOTIFY woke it


APP = """
import serve_core as serve

serve.create_endpoint("echo", "/echo")
serve.create_backend(lambda request: "v1", "echo:v1")
serve.create_backend(lambda request: "v2", "echo:v2")
serve.link("echo", "echo:v1")
"""


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serve_core.cli", *args],
        cwd=cwd, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=3 * WAIT,
    )


def _status(store: str, cwd: Path) -> dict[str, object]:
    done = _cli("status", "--kv-store", store, "--json", cwd=cwd)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def _converged(store: str, cwd: Path, workers: int) -> bool:
    status = _status(store, cwd)
    instances = status["instances"]
    assert isinstance(instances, list)
    return len(instances) == workers and all(i["revision"] == status["revision"] for i in instances)


def test_split_and_scale_from_the_shell_reach_a_running_server(tmp_path: Path) -> None:
    app, store = tmp_path / "app.py", str(tmp_path / "s.db")
    app.write_text(textwrap.dedent(APP))
    port = free_port()
    with (tmp_path / "server.log").open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serve_core.cli", "run", str(app), "--port", str(port), "--kv-store", store],
            cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=sink, stderr=sink,
        )
    try:
        url = f"http://127.0.0.1:{port}/echo"
        assert wait_until(lambda: _answers(url) == {"v1"}, 3 * WAIT)
        split = _cli("split", "--kv-store", store, "echo", "echo:v1=0", "echo:v2=1", cwd=tmp_path)
        assert split.returncode == 0, split.stderr
        scale = _cli("scale", "--kv-store", store, "echo:v2", "3", cwd=tmp_path)
        assert scale.returncode == 0, scale.stderr
        assert wait_until(lambda: _answers(url) == {"v2"}, WAIT)  # no restart
        assert wait_until(lambda: _converged(store, tmp_path, 1), WAIT)
        backends = _status(store, tmp_path)["backends"]
        assert isinstance(backends, dict)
        assert backends["echo:v2"]["desired"] == 3 and list(backends["echo:v2"]["running"].values()) == [3]
        text = _cli("status", "--kv-store", store, cwd=tmp_path).stdout
        assert "echo:v1 0, echo:v2 1" in text and f"127.0.0.1:{port}" in text
        bad = _cli("split", "--kv-store", store, "echo", "nope=1", cwd=tmp_path)
        assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "nope" in bad.stderr
    finally:
        proc.terminate()
        proc.wait(WAIT)


def _answers(url: str) -> set[str]:
    try:
        return {requests.get(url, timeout=WAIT).text for _ in range(10)}
    except requests.ConnectionError:
        return set()


@pytest.mark.parametrize("server", ["gunicorn", "granian"])
def test_wsgi_workers_converge_on_one_registry(server: str, tmp_path: Path) -> None:
    from ..conftest import require

    require(_has(server), f"{server} is not installed (pip install {server})")
    app, store = tmp_path / "app.py", str(tmp_path / "s.db")
    app.write_text(textwrap.dedent(APP))
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), SERVE_CORE_APP=str(app), SERVE_CORE_KV_STORE=store)
    if server == "gunicorn":  # an app factory, no --preload: each worker builds its own instance
        command = ["-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}", "--graceful-timeout", "5",
                   "serve_core.http.granian:app_from_env()"]
    else:
        command = ["-m", "serve_core.cli", "run", str(app), "--server", "granian", "--workers", "2",
                   "--port", str(port), "--kv-store", store]
    log = tmp_path / "server.log"  # a file, not a pipe nobody reads: a full pipe would block the server
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, *command], cwd=tmp_path, env=env, stdout=sink, stderr=sink)
    try:
        converged = wait_until(lambda: Path(store).exists() and _converged(store, tmp_path, 2), 6 * WAIT)
        assert converged, log.read_text()
        url = f"http://127.0.0.1:{port}/echo"
        assert _answers(url) == {"v1"}
        split = _cli("split", "--kv-store", store, "echo", "echo:v2=1", cwd=tmp_path)
        assert split.returncode == 0, split.stderr
        assert wait_until(lambda: _converged(store, tmp_path, 2), WAIT)
        assert {requests.get(url, timeout=WAIT).text for _ in range(30)} == {"v2"}  # whichever worker answers
    finally:
        proc.terminate()
        proc.wait(3 * WAIT)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_concurrent_writers_leave_every_record_readable(store_url: str, spawn: Callable[..., Child]) -> None:
    count = 10
    run_together([spawn("fill", store_url, prefix, str(count)) for prefix in ("p", "q")])
    sql = SQLKVStore(store_url, "registry")
    registry_store = RegistryStore(sql, None, store_url, durable=True)
    snapshot = registry_store.load()
    registry, problems = snapshot.registry(store_url)
    sql.close()
    assert not problems
    assert sorted(registry.endpoints) == sorted(f"{p}{i}" for p in "pq" for i in range(count))
    assert sorted(registry.traffic) == sorted(registry.endpoints)
    assert snapshot.revision == 2 * count * 3  # endpoint, backend, link: every commit counted once

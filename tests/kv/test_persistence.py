"""Registry persistence and recovery in one process: writes, atomicity, code storage, conflicts."""

from __future__ import annotations

import base64
import logging
import os
import pickle
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from serve_core import BackendConfig, ConflictError, NotFoundError, Serve, StoreError
from serve_core.kv.memory import MemoryKVStore
from serve_core.kv.sql import SQLKVStore

from ..conftest import WAIT
from .backends import Greeter, Tagged, echo, make_shout

MakeServe = Callable[..., Serve]


class RecordingStore:
    """A custom store (no signing key of its own) that records writes and can fail them."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._data = MemoryKVStore(namespace)
        self.writes: list[dict[str, Any]] = []
        self.fail = False

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def put(self, key: str, value: Any) -> None:
        self.update({key: value})

    def delete(self, key: str) -> None:
        self.update({}, [key])

    def as_dict(self) -> dict[str, Any]:
        return self._data.as_dict()

    def registry(self) -> dict[str, Any]:
        """The registry's records (without the revision counter and the instances' heartbeats)."""
        return {k: v for k, v in self.as_dict().items() if not k.startswith(("meta/", "instance/"))}

    def registry_writes(self) -> list[list[str]]:
        names = ([k for k in w if not k.startswith(("meta/", "instance/"))] for w in self.writes)
        return [sorted(w) for w in names if w]

    def update(self, items: Mapping[str, Any], delete: Iterable[str] = ()) -> None:
        if self.fail:
            raise StoreError("injected write failure")
        self.writes.append(dict(items))
        self._data.update(items, delete)

    def close(self) -> None:
        self._data.close()


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    """SERVE_CORE_SECRET set: custom stores can then keep closures."""
    monkeypatch.setenv("SERVE_CORE_SECRET", "test-secret-0123456789")
    return "test-secret-0123456789"


def _deploy(srv: Serve) -> None:
    srv.create_endpoint("api", "/api", methods=["GET", "POST"])
    srv.create_backend(Greeter, "greet:v1", "hello", backend_config=BackendConfig(max_batch_size=4))
    srv.create_backend(make_shout("!"), "shout:v1")
    srv.split("api", {"greet:v1": 0.5, "shout:v1": 0.5})


def test_without_a_store_nothing_is_written(
    make_serve: MakeServe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    srv = make_serve()
    _deploy(srv)
    assert srv.get_handle("api").remote(name="a").result(WAIT) in {"hello a", "a!"}
    srv.shutdown()
    assert list(tmp_path.iterdir()) == []
    assert not srv.restored


def test_a_custom_connector_receives_the_writes(make_serve: MakeServe, secret: str) -> None:
    stores: list[RecordingStore] = []

    def connector(namespace: str) -> RecordingStore:
        stores.append(RecordingStore(namespace))
        return stores[-1]

    srv = make_serve(kv_store_connector=connector)
    _deploy(srv)
    config = srv.get_backend_config("shout:v1")
    config.num_replicas = 2
    srv.set_backend_config("shout:v1", config)
    (store,) = stores
    assert store.namespace == "registry"
    assert store.registry_writes() == [
        ["endpoint/api"],
        ["backend/greet:v1", "config/greet:v1"],  # one atomic write per new backend
        ["backend/shout:v1", "config/shout:v1"],
        ["traffic/api"],
        ["config/shout:v1"],
    ]
    data = store.as_dict()
    assert data["endpoint/api"]["value"] == {"route": "/api", "methods": ["GET", "POST"]}
    assert set(data["endpoint/api"]) == {"value", "sig"}  # signed with SERVE_CORE_SECRET
    assert data["backend/greet:v1"]["target"] == {"kind": "import", "ref": "tests.kv.backends:Greeter"}
    assert data["backend/greet:v1"]["init_args"] == {"kind": "json", "value": ["hello"]}
    assert data["backend/shout:v1"]["target"]["kind"] == "pickle"
    assert data["config/shout:v1"]["value"]["num_replicas"] == 2
    assert data["traffic/api"]["value"] == {"greet:v1": 0.5, "shout:v1": 0.5}


def test_a_connector_store_shared_by_two_instances_restores(make_serve: MakeServe) -> None:
    store = MemoryKVStore("registry")
    _deploy(make_serve(kv_store_connector=lambda ns: store))
    second = make_serve(kv_store_connector=lambda ns: store)
    assert second.restored.backends == ["greet:v1", "shout:v1"]
    assert second.get_handle("api").options().remote(name="b").result(WAIT) in {"hello b", "b!"}


def test_a_failed_write_changes_nothing(make_serve: MakeServe, secret: str) -> None:
    store = RecordingStore("registry")
    srv = make_serve(kv_store_connector=lambda ns: store)
    srv.create_endpoint("api", "/api")
    srv.create_endpoint("unlinked", "/unlinked")
    srv.create_backend(echo, "echo:v1")
    srv.link("api", "echo:v1")
    before = store.registry()
    store.fail = True
    with pytest.raises(StoreError, match="injected"):
        srv.create_endpoint("other", "/other")
    with pytest.raises(StoreError, match="injected"):
        srv.create_backend(echo, "echo:v2")
    with pytest.raises(StoreError, match="injected"):
        srv.split("unlinked", {"echo:v1": 1.0})
    with pytest.raises(StoreError, match="injected"):
        srv.set_backend_config("echo:v1", BackendConfig(num_replicas=3))
    assert store.registry() == before
    with pytest.raises(NotFoundError):
        srv.get_handle("other")
    with pytest.raises(NotFoundError):
        srv.get_backend_config("echo:v2")
    assert srv.get_backend_config("echo:v1").num_replicas == 1
    assert len(srv.replica_ids("echo:v1")) == 1
    assert "echo:v2" not in srv.list_backends()
    store.fail = False
    srv.create_backend(echo, "echo:v2")  # nothing was half-registered
    assert srv.get_handle("api").remote(name="n").result(WAIT) == "echo n"


def test_a_store_without_a_key_is_refused_unless_allowed(
    make_serve: MakeServe, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("SERVE_CORE_SECRET", raising=False)
    store = RecordingStore("registry")
    with pytest.raises(StoreError, match="SERVE_CORE_SECRET") as refused:
        make_serve(kv_store_connector=lambda ns: store)
    assert "allow_unsigned_store=True" in str(refused.value) and not store.writes
    with caplog.at_level(logging.WARNING, logger="serve_core"):
        srv = make_serve(kv_store_connector=lambda ns: store, allow_unsigned_store=True)
    assert any("unsigned records are allowed" in r.message for r in caplog.records)  # warned at every start
    srv.create_backend(echo, "echo:v1")  # importable: fine without a key
    with pytest.raises(StoreError, match="SERVE_CORE_SECRET"):
        srv.create_backend(make_shout("?"), "shout:v1")
    assert sorted(store.registry()) == ["backend/echo:v1", "config/echo:v1"]
    with pytest.raises(NotFoundError):
        srv.get_backend_config("shout:v1")
    assert "sig" not in store.get("backend/echo:v1")  # no key: import paths only, unsigned
    monkeypatch.setenv("SERVE_CORE_ALLOW_UNSIGNED", "1")  # the same opt-in, from the environment
    assert make_serve(kv_store_connector=lambda ns: store).restored.backends == ["echo:v1"]


def test_tampered_config_and_traffic_records_are_refused(
    make_serve: MakeServe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "r.db"
    _sqlite_registry(make_serve, path, monkeypatch)
    store = SQLKVStore(str(path), "registry")
    config = store.get("config/greet:v1")
    config["value"]["num_replicas"] = 50  # an attacker scales it, keeping the old signature
    store.put("config/greet:v1", config)
    store.put("traffic/api", {"shout:v1": 1.0})  # or writes a record without one
    store.close()
    srv = make_serve(kv_store_path=str(path))
    assert "signature does not verify" in srv.restored.failed["backend/greet:v1"]
    assert "unsigned" in srv.restored.failed["traffic/api"]
    assert "greet:v1" not in srv.restored.backends


def test_a_closure_is_signed_with_the_environment_secret(
    make_serve: MakeServe, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVE_CORE_SECRET", "x" * 20)
    store = RecordingStore("registry")

    def connect(namespace: str) -> RecordingStore:
        return store

    make_serve(kv_store_connector=connect).create_backend(make_shout("?"), "shout:v1")
    assert make_serve(kv_store_connector=connect).restored.backends == ["shout:v1"]
    monkeypatch.setenv("SERVE_CORE_SECRET", "y" * 20)  # another key: refused, not unpickled
    again = make_serve(kv_store_connector=connect)
    assert "does not verify" in again.restored.failed["backend/shout:v1"]


def test_a_short_secret_is_refused(make_serve: MakeServe, monkeypatch: Any) -> None:
    monkeypatch.setenv("SERVE_CORE_SECRET", "short")
    with pytest.raises(StoreError, match="at least 16"):
        make_serve(kv_store_connector=lambda ns: MemoryKVStore(ns))


def _sqlite_registry(make_serve: MakeServe, path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("SERVE_CORE_SECRET", raising=False)
    srv = make_serve(kv_store_path=str(path))
    _deploy(srv)
    srv.create_backend(Tagged, "tags:v1", {"b", "a"})  # init args not JSON-safe: signed pickle
    srv.create_endpoint("tags", None)
    srv.link("tags", "tags:v1")
    srv.shutdown()


def test_non_json_init_args_come_back(make_serve: MakeServe, tmp_path: Path, monkeypatch: Any) -> None:
    path = tmp_path / "r.db"
    _sqlite_registry(make_serve, path, monkeypatch)
    srv = make_serve(kv_store_path=str(path))
    assert srv.get_handle("tags").remote().result(WAIT) == ["a", "b"]


def test_a_tampered_signature_is_refused_and_the_rest_comes_back(
    make_serve: MakeServe, tmp_path: Path, monkeypatch: Any, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "r.db"
    _sqlite_registry(make_serve, path, monkeypatch)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> Any:
            return (open, (str(marker), "w"))

    store = SQLKVStore(str(path), "registry")
    record = store.get("backend/shout:v1")
    record["target"]["data"] = base64.b64encode(pickle.dumps(Exploit())).decode()  # same old signature
    store.put("backend/shout:v1", record)
    store.close()

    with caplog.at_level(logging.INFO, logger="serve_core"):
        srv = make_serve(kv_store_path=str(path))
    assert not marker.exists()  # the unverified pickle was never loaded
    assert list(srv.restored.failed) == ["backend/shout:v1"]
    assert "does not verify" in srv.restored.failed["backend/shout:v1"]
    assert srv.restored.backends == ["greet:v1", "tags:v1"]
    assert "shout:v1" in srv.restored.degraded["api"]
    assert srv.get_traffic_policy("api") == {"greet:v1": 0.5, "shout:v1": 0.5}  # the store's, kept
    assert {srv.get_handle("api").remote(name="c").result(WAIT) for _ in range(8)} == {"hello c"}
    assert any("could not restore backend/shout:v1" in r.message for r in caplog.records)
    assert any("restored from sqlite" in r.message for r in caplog.records)


def test_a_backend_that_no_longer_imports_is_skipped(
    make_serve: MakeServe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "vanishing_backend.py").write_text("def hello(request):\n    return 'hi'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import vanishing_backend

    path = tmp_path / "r.db"
    _sqlite_registry(make_serve, path, monkeypatch)
    srv = make_serve(kv_store_path=str(path))
    srv.create_backend(vanishing_backend.hello, "gone:v1")
    srv.shutdown()
    (tmp_path / "vanishing_backend.py").unlink()
    monkeypatch.delitem(sys.modules, "vanishing_backend")

    srv = make_serve(kv_store_path=str(path))
    assert "cannot import 'vanishing_backend:hello'" in srv.restored.failed["backend/gone:v1"]
    assert srv.restored.backends == ["greet:v1", "shout:v1", "tags:v1"]
    assert srv.get_handle("tags").remote().result(WAIT) == ["a", "b"]


def test_a_redirected_import_path_is_refused(make_serve: MakeServe, tmp_path: Path, monkeypatch: Any) -> None:
    path = tmp_path / "r.db"
    _sqlite_registry(make_serve, path, monkeypatch)
    store = SQLKVStore(str(path), "registry")
    record = store.get("backend/tags:v1")
    record["target"] = {"kind": "import", "ref": "tests.kv.backends:Greeter"}  # attacker's choice
    store.put("backend/tags:v1", record)
    store.close()
    srv = make_serve(kv_store_path=str(path))
    assert "record does not verify" in srv.restored.failed["backend/tags:v1"]
    assert srv.restored.backends == ["greet:v1", "shout:v1"]


def test_a_sqlite_store_gets_a_private_key_file(
    make_serve: MakeServe, tmp_path: Path, monkeypatch: Any
) -> None:
    _sqlite_registry(make_serve, tmp_path / "r.db", monkeypatch)
    key_file = tmp_path / "r.db.key"
    assert oct(key_file.stat().st_mode & 0o777) == oct(0o600)
    os.chmod(key_file, 0o644)
    assert make_serve(kv_store_path=str(tmp_path / "r.db")).restored.backends  # warns, still works


def test_identical_redefinition_keeps_the_live_config(make_serve: MakeServe) -> None:
    srv = make_serve()
    srv.create_backend(Greeter, "greet:v1", "hello", backend_config=BackendConfig(max_batch_size=4))
    srv.set_backend_config("greet:v1", BackendConfig(num_replicas=2, max_batch_size=4))
    srv.create_backend(Greeter, "greet:v1", "hello", backend_config=BackendConfig(max_batch_size=4))
    assert srv.get_backend_config("greet:v1").num_replicas == 2


def test_a_conflicting_definition_says_how_to_replace_it(make_serve: MakeServe) -> None:
    srv = make_serve()
    srv.create_backend(Greeter, "greet:v1", "hello", backend_config=BackendConfig(max_batch_size=4))
    with pytest.raises(ConflictError, match=r"new tag.*split\(\)") as caught:
        srv.create_backend(Greeter, "greet:v1", "bonjour", backend_config=BackendConfig(max_batch_size=4))
    assert "set_backend_config" in str(caught.value)
    with pytest.raises(ConflictError):
        srv.create_backend(echo, "greet:v1")


def test_the_core_does_not_import_sqlalchemy_without_a_sql_store() -> None:
    import subprocess
    import sys

    code = (
        "import sys, serve_core; serve_core.Serve(start_server=False).shutdown(); "
        "print(sorted(m for m in ('sqlalchemy', 'serve_core.kv.sql') if m in sys.modules))"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_postgres_without_a_secret_is_refused_and_tampering_is_caught(
    make_serve: MakeServe, pg_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("SERVE_CORE_SECRET", raising=False)
    monkeypatch.delenv("SERVE_CORE_ALLOW_UNSIGNED", raising=False)
    with pytest.raises(StoreError, match="SERVE_CORE_SECRET"):
        make_serve(kv_store_path=pg_url)
    with caplog.at_level(logging.WARNING, logger="serve_core"):
        make_serve(kv_store_path=pg_url, allow_unsigned_store=True).shutdown()
    assert any("unsigned records are allowed" in r.message for r in caplog.records)
    monkeypatch.setenv("SERVE_CORE_SECRET", "postgres-test-secret-0123")
    srv = make_serve(kv_store_path=pg_url)
    srv.create_endpoint("api", "/api")
    srv.create_backend(echo, "echo:v1")
    srv.link("api", "echo:v1")
    srv.shutdown()
    store = SQLKVStore(pg_url, "registry")
    config = store.get("config/echo:v1")
    config["value"]["num_replicas"] = 50
    store.put("config/echo:v1", config)
    store.put("traffic/api", {"value": {"echo:v1": 1.0}, "sig": "0" * 64})
    store.close()
    again = make_serve(kv_store_path=pg_url)
    assert "does not verify" in again.restored.failed["backend/echo:v1"]
    assert "does not verify" in again.restored.failed["traffic/api"]

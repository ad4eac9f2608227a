"""The KV store contract, run against memory, SQLite and PostgreSQL."""

from __future__ import annotations

import importlib.util
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from serve_core.errors import ServeTypeError, StoreError, ValidationError
from serve_core.kv.base import MAX_KEY_LENGTH, KVStore

OpenKV = Callable[[str], KVStore]


def test_missing_key_gives_the_default(open_kv: OpenKV) -> None:
    store = open_kv("ns")
    assert isinstance(store, KVStore)
    assert store.get("nope") is None
    assert store.get("nope", 42) == 42
    assert store.as_dict() == {}


@pytest.mark.parametrize(
    "value", [None, True, 0, -3, 2.5, "", "text é ✓", [1, "a", None], {"a": {"b": [1.5, False]}}]
)
def test_json_values_round_trip(open_kv: OpenKV, value: Any) -> None:
    store = open_kv("ns")
    store.put("k", value)
    assert store.get("k", "default") == value


def test_put_overwrites_and_delete_removes(open_kv: OpenKV) -> None:
    store = open_kv("ns")
    store.put("k", 1)
    store.put("k", {"v": 2})
    assert store.get("k") == {"v": 2}
    store.delete("k")
    store.delete("k")  # a missing key is not an error
    assert store.get("k") is None
    assert store.as_dict() == {}


def test_values_are_copies(open_kv: OpenKV) -> None:
    store = open_kv("ns")
    value = {"list": [1]}
    store.put("k", value)
    value["list"].append(2)
    store.get("k")["list"].append(3)
    assert store.get("k") == {"list": [1]}


def test_as_dict_holds_the_namespace(open_kv: OpenKV) -> None:
    store = open_kv("ns")
    store.put("a", 1)
    store.put("b/c", [2])
    assert store.as_dict() == {"a": 1, "b/c": [2]}


def test_namespaces_are_isolated(open_kv: OpenKV) -> None:
    one, two = open_kv("one"), open_kv("two")
    one.put("k", "from one")
    two.put("k", "from two")
    one.delete("k")
    assert one.get("k") is None
    assert two.get("k") == "from two"
    assert two.as_dict() == {"k": "from two"}


def test_data_survives_reopening(open_kv: OpenKV) -> None:
    first = open_kv("ns")
    first.put("k", [1, 2])
    first.close()
    assert open_kv("ns").get("k") == [1, 2]


def test_update_applies_puts_and_deletes_together(open_kv: OpenKV) -> None:
    store = open_kv("ns")
    store.update({"a": 1, "b": 2})
    store.update({"c": 3, "a": 10}, delete=["b", "missing"])
    assert store.as_dict() == {"a": 10, "c": 3}


def test_update_with_a_bad_value_writes_nothing(open_kv: OpenKV) -> None:
    store = open_kv("ns")
    store.put("a", 1)
    for bad in (object(), float("nan"), {1: "int key"}.keys()):
        with pytest.raises(ServeTypeError, match="not JSON-safe"):
            store.update({"b": 2, "c": bad}, delete=["a"])
    assert store.as_dict() == {"a": 1}


@pytest.mark.parametrize("key", ["", "x" * (MAX_KEY_LENGTH + 1), 7, None])
def test_bad_keys_are_refused(open_kv: OpenKV, key: Any) -> None:
    store = open_kv("ns")
    with pytest.raises((ValidationError, ServeTypeError)):
        store.put(key, 1)
    with pytest.raises((ValidationError, ServeTypeError)):
        store.update({"ok": 1}, delete=[key])
    assert store.as_dict() == {}


def test_longest_key_fits(open_kv: OpenKV) -> None:
    store = open_kv("ns")
    store.put("k" * MAX_KEY_LENGTH, "v")
    assert store.get("k" * MAX_KEY_LENGTH) == "v"


def test_close_is_idempotent(open_kv: OpenKV) -> None:
    store = open_kv("ns")
    store.close()
    store.close()


# ------------------------------------------------------------------ SQL only
def test_a_failing_statement_rolls_back_the_whole_update(sql_url: str) -> None:
    from sqlalchemy import event

    from serve_core.kv.sql import SQLKVStore

    store = SQLKVStore(sql_url, "ns")
    try:
        store.put("a", 1)
        statements: list[str] = []

        def fail_second(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            statements.append(statement)
            if len(statements) == 2:
                raise RuntimeError("injected failure")

        event.listen(store.engine, "before_cursor_execute", fail_second)
        with pytest.raises(RuntimeError, match="injected"):
            store.update({"b": 2, "c": 3}, delete=["a"])
        event.remove(store.engine, "before_cursor_execute", fail_second)
        assert store.as_dict() == {"a": 1}
    finally:
        store.close()


def test_the_table_is_created_on_open_not_in_the_constructor(tmp_path: Path) -> None:
    from serve_core.kv.sql import SQLKVStore

    path = tmp_path / "lazy.db"
    store = SQLKVStore(str(path), "ns")
    assert not path.exists()
    store.put("k", 1)
    assert path.exists()
    store.close()


def test_driver_errors_name_the_url_without_its_password(tmp_path: Path) -> None:
    from serve_core.kv.sql import SQLKVStore

    store = SQLKVStore("postgresql+psycopg://user:hunter2secret@127.0.0.1:1/db", "ns")
    with pytest.raises(StoreError) as caught:
        store.get("k")
    assert "postgresql+psycopg://user:***@127.0.0.1:1/db" in str(caught.value)
    assert "hunter2secret" not in str(caught.value)
    missing = SQLKVStore(str(tmp_path / "no" / "such" / "dir.db"), "ns")
    with pytest.raises(StoreError, match="dir.db"):
        missing.put("k", 1)


def test_a_bad_url_is_a_store_error() -> None:
    from serve_core.kv.sql import SQLKVStore

    with pytest.raises(StoreError, match="nosuchdialect.*cannot create an engine"):
        SQLKVStore("nosuchdialect+x://host/db", "ns")


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    from sqlalchemy import text

    from serve_core.kv.sql import SQLKVStore

    store = SQLKVStore(str(tmp_path / "wal.db"), "ns")
    store.put("k", 1)
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert (conn.execute(text("PRAGMA busy_timeout")).scalar() or 0) > 0
    store.close()


def test_a_plain_postgresql_url_uses_psycopg3() -> None:
    from serve_core.kv.sql import to_url

    assert to_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert to_url("relative.db").database == os.path.abspath("relative.db")


def test_sqlite_key_file_is_private(tmp_path: Path) -> None:
    from serve_core.kv.secret import resolve_secret
    from serve_core.kv.sql import SQLKVStore

    store = SQLKVStore(str(tmp_path / "k.db"), "ns")
    key = resolve_secret(store)
    key_file = tmp_path / "k.db.key"
    assert key is not None and key_file.exists()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert resolve_secret(store) == key  # read back, not replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.db.key"]
    store.close()


def test_a_missing_database_driver_is_a_store_error_naming_it() -> None:
    if importlib.util.find_spec("pymysql") is not None:
        pytest.skip("pymysql is installed: no missing driver to report")
    from serve_core.kv.sql import SQLKVStore

    with pytest.raises(StoreError, match="driver is not installed.*pymysql"):
        SQLKVStore("mysql+pymysql://user@127.0.0.1/db", "ns")


def test_compare_and_update_writes_only_while_its_key_is_unchanged(open_kv: OpenKV) -> None:
    from serve_core.kv.base import AtomicKVStore

    store = open_kv("ns")
    assert isinstance(store, AtomicKVStore)
    assert store.compare_and_update("rev", None, {"rev": 1, "a": "first"})
    assert not store.compare_and_update("rev", None, {"rev": 1, "a": "lost"})  # it exists now
    assert not store.compare_and_update("rev", 7, {"rev": 8, "a": "lost"}, delete=["a"])  # stale
    assert store.as_dict() == {"rev": 1, "a": "first"}  # a miss writes nothing, deletes nothing
    assert store.compare_and_update("rev", 1, {"rev": 2, "b": [1]}, delete=["a"])
    assert store.as_dict() == {"rev": 2, "b": [1]}
    with pytest.raises(ValidationError, match="must write its key"):
        store.compare_and_update("rev", 2, {"other": 1})


def test_compare_and_update_loses_no_increment_under_contention(open_kv: OpenKV) -> None:
    import threading

    stores = [open_kv("ns") for _ in range(4)]  # one store object (and connection pool) per writer
    per_writer = 15

    def bump(store: Any) -> None:
        for _ in range(per_writer):
            while True:
                current = store.get("n")
                if store.compare_and_update("n", current, {"n": (current or 0) + 1, f"seen/{current}": True}):
                    break

    writers = [threading.Thread(target=bump, args=(store,)) for store in stores]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
    total = len(stores) * per_writer
    data = stores[0].as_dict()
    assert data["n"] == total
    assert sorted(k for k in data if k.startswith("seen/")) == sorted(
        ["seen/None", *(f"seen/{i}" for i in range(1, total))]
    )

"""KV fixtures: stores on memory, SQLite and PostgreSQL (one fresh schema per test)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from serve_core.kv.base import KVStore
from serve_core.kv.memory import MemoryKVStore

from ..conftest import require
from .children import SECRET, Child

POSTGRES_ENV = "SERVE_CORE_TEST_POSTGRES_URL"
STORES = ["memory", "sqlite", "postgres"]
SQL_STORES = ["sqlite", "postgres"]


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose ``search_path`` is a schema made for this test (dropped after)."""
    base = os.environ.get(POSTGRES_ENV)
    require(base is not None, f"{POSTGRES_ENV} is not set (e.g. postgresql+psycopg://postgres@127.0.0.1/test)")
    import sqlalchemy as sa

    assert base is not None
    schema = f"sc_test_{uuid.uuid4().hex[:12]}"  # generated here, never user input
    engine = sa.create_engine(base)
    with engine.begin() as conn:
        conn.execute(sa.schema.CreateSchema(schema))
    url = sa.make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with engine.begin() as conn:
            conn.execute(sa.schema.DropSchema(schema, cascade=True))
        engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'registry.db'}"


@pytest.fixture(params=SQL_STORES)
def sql_url(request: pytest.FixtureRequest) -> str:
    """The URL of a fresh SQLite file or PostgreSQL schema."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(name))


@pytest.fixture(params=STORES)
def open_kv(request: pytest.FixtureRequest) -> Iterator[Callable[[str], KVStore]]:
    """Open stores of one kind by namespace; stores opened by one test share a database."""
    opened: list[KVStore] = []
    fixture = {"memory": None, "sqlite": "sqlite_url", "postgres": "pg_url"}[request.param]
    url = None if fixture is None else str(request.getfixturevalue(fixture))
    memories: dict[str, MemoryKVStore] = {}

    def open_store(namespace: str) -> KVStore:
        store: KVStore
        if url is None:
            store = memories.setdefault(namespace, MemoryKVStore(namespace))
        else:
            from serve_core.kv.sql import SQLKVStore

            store = SQLKVStore(url, namespace)
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Child]]:
    children: list[Child] = []

    def start(*args: str) -> Child:
        child = Child(list(args), tmp_path / f"child{len(children)}.log")
        children.append(child)
        return child

    yield start
    for child in children:
        if child.proc.poll() is None:
            child.kill()


@pytest.fixture
def store_url(sql_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """SQLite signs with its key file; PostgreSQL needs SERVE_CORE_SECRET (children inherit it)."""
    if sql_url.startswith("sqlite"):
        monkeypatch.delenv("SERVE_CORE_SECRET", raising=False)
    else:
        monkeypatch.setenv("SERVE_CORE_SECRET", SECRET)
    return sql_url

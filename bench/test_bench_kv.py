"""KV store cost: registry changes on memory vs SQLite vs PostgreSQL, and recovery time.

Run: ``python -m pytest bench/test_bench_kv.py --benchmark-only`` (PostgreSQL rows need
``SERVE_CORE_TEST_POSTGRES_URL``). Groups, each with an in-run baseline:

* ``kv: create_backend+split+set_backend_config`` — one backend created, linked and
  reconfigured (inline executor, so replica start costs almost nothing); baseline: the
  default memory store.
* ``kv: init -> first answer, 100 endpoints+backends`` — ``Serve(...)`` recovering a
  registry of 100 endpoints and backends (thread executor) up to the first answered
  request; baseline: deploying the same 100 by API calls on a memory store.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serve_core import BackendConfig, Serve

POSTGRES_ENV = "SERVE_CORE_TEST_POSTGRES_URL"
RECOVERED = 100
CHANGES = "kv: create_backend+split+set_backend_config"
RECOVERY = f"kv: init -> first answer, {RECOVERED} endpoints+backends"


def echo(flask_request: Any, name: str = "x") -> str:
    return f"echo {name}"


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str | None]:
    """``None`` (memory), a SQLite URL, or a PostgreSQL URL on a fresh schema."""
    if request.param == "memory":
        yield None
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'bench.db'}"
    else:
        yield from _postgres()


def _postgres() -> Iterator[str]:
    base = os.environ.get(POSTGRES_ENV)
    if base is None:
        pytest.skip(f"{POSTGRES_ENV} is not set")
    import sqlalchemy as sa

    schema = f"sc_bench_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(base)
    with engine.begin() as conn:
        conn.execute(sa.schema.CreateSchema(schema))
    try:
        yield sa.make_url(base).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False
        )
    finally:
        with engine.begin() as conn:
            conn.execute(sa.schema.DropSchema(schema, cascade=True))
        engine.dispose()


def _role(benchmark: Any, group: str, store: str | None) -> None:
    benchmark.group = group
    benchmark.extra_info["role"] = "baseline" if store is None else "subject"
    benchmark.extra_info["store"] = "memory" if store is None else store.split(":", 1)[0]


def test_registry_changes(benchmark: Any, store: str | None) -> None:
    _role(benchmark, CHANGES, store)
    srv = Serve(kv_store_path=store, start_server=False, executor="inline")
    srv.create_endpoint("e")
    ids = itertools.count()

    def change() -> None:
        tag = f"b{next(ids)}"
        srv.create_backend(echo, tag)
        srv.split("e", {tag: 1.0})
        srv.set_backend_config(tag, BackendConfig(max_queue_size=100))

    try:
        benchmark.pedantic(change, rounds=200, warmup_rounds=5)
    finally:
        srv.shutdown()


def _deploy(srv: Serve) -> None:
    for i in range(RECOVERED):
        srv.create_endpoint(f"e{i}", f"/e{i}")
        srv.create_backend(echo, f"b{i}")
        srv.link(f"e{i}", f"b{i}")


def test_recovery(benchmark: Any, store: str | None) -> None:
    _role(benchmark, RECOVERY, store)
    if store is not None:
        with Serve(kv_store_path=store, start_server=False) as builder:
            _deploy(builder)
    live: list[Serve] = []

    def start() -> None:
        while live:
            live.pop().shutdown()

    def recover() -> None:
        srv = Serve(kv_store_path=store, start_server=False)
        live.append(srv)
        if store is None:
            _deploy(srv)  # baseline: the same registry built by API calls, no store
        assert srv.get_handle(f"e{RECOVERED - 1}").remote(name="z").result(30) == "echo z"

    try:
        benchmark.pedantic(recover, setup=start, rounds=10, warmup_rounds=1)
    finally:
        start()



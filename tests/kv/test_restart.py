"""Restart tests: a registry built in a subprocess killed with SIGKILL comes back."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from serve_core import Serve
from serve_core.kv.sql import SQLKVStore

from ..conftest import WAIT
from .children import Child, run_together


def _check_deployment(srv: Serve) -> None:
    assert srv.restored.endpoints == ["api"]
    assert srv.restored.backends == ["greet:v1", "shout:v1"]
    assert srv.restored.traffic == ["api"] and not srv.restored.failed
    assert srv.route_table() == {"/api": ["api", ["GET", "POST"]]}
    config = srv.get_backend_config("greet:v1")
    assert (config.num_replicas, config.max_batch_size) == (2, 4)
    assert len(srv.replica_ids("greet:v1")) == 2
    assert srv.get_traffic_policy("api") == pytest.approx({"greet:v1": 0.7, "shout:v1": 0.3})
    handle = srv.get_handle("api")
    answers = {handle.remote(name="bob").result(WAIT) for _ in range(60)}
    assert answers == {"hello bob", "bob!"}


def test_registry_survives_sigkill_and_rerunning_the_script_is_a_no_op(
    store_url: str, spawn: Callable[..., Child], make_serve: Callable[..., Serve]
) -> None:
    first = spawn("build", store_url)
    assert json.loads(first.expect("READY"))["restored"] == []
    first.kill()

    srv = make_serve(kv_store_path=store_url)
    _check_deployment(srv)
    config = srv.get_backend_config("greet:v1")
    config.num_replicas = 3  # an operator scales at runtime
    srv.set_backend_config("greet:v1", config)
    srv.shutdown()

    again = spawn("build", store_url)  # the same deployment script, run again after a restart
    state = json.loads(again.expect("READY"))
    assert state["restored"] == ["greet:v1", "shout:v1"]
    assert state["num_replicas"] == 3  # identical code: the live config is kept
    assert state["traffic"] == pytest.approx({"greet:v1": 0.7, "shout:v1": 0.3})
    again.kill()


def test_two_processes_share_one_sqlite_file(
    tmp_path: Path, spawn: Callable[..., Child], make_serve: Callable[..., Serve]
) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    count = 25
    children = [spawn("fill", url, prefix, str(count)) for prefix in ("a", "b")]
    run_together(children)
    for child in children:
        child.close()

    store = SQLKVStore(url, "registry")
    with store.engine.connect() as conn:
        from sqlalchemy import text

        assert conn.execute(text("PRAGMA integrity_check")).scalar() == "ok"
    store.close()
    srv = make_serve(kv_store_path=url)
    expected = sorted(f"{p}{i}" for p in "ab" for i in range(count))
    assert sorted(srv.restored.endpoints) == expected
    assert sorted(srv.restored.traffic) == expected
    assert srv.get_handle("b7").remote(name="z").result(WAIT) == "echo z"



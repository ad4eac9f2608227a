"""Handles stored with their backend, in SQLite and PostgreSQL: signed, restored, rebound to the new instance."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from serve_core import Serve

from ..conftest import WAIT
from ..test_composition import deploy, deploy_model, inside_backend, pipeline_backend


def test_a_handle_init_argument_is_stored_signed_and_restored(make_serve: Callable[..., Serve], store_url: str) -> None:
    first = make_serve(executor="thread", kv_store_path=store_url)
    deploy(first, "pipe", pipeline_backend(), deploy_model(first).options(method_name="twice"))
    deploy(first, "inside", inside_backend())
    assert first.get_handle("pipe").remote(x=3).result(WAIT) == ("pipe", 6)
    first.shutdown()
    engine = sa.create_engine(store_url)
    try:
        with engine.connect() as conn:
            rows = [row for row in conn.execute(sa.text("SELECT key, value FROM serve_core_kv")) if "pipe:v1" in row[0]]
    finally:
        engine.dispose()
    record: Any = json.loads(next(value for key, value in rows if key.startswith("backend/")))
    assert record["init_args"]["kind"] == "pickle" and record["init_args"]["sig"] and record["sig"]
    second = make_serve(executor="thread", kv_store_path=store_url)
    assert "pipe:v1" in second.restored.backends, second.restored
    assert second.get_handle("pipe").remote(x=3).result(WAIT) == ("pipe", 6)  # method_name kept
    assert tuple(second.get_handle("inside").remote(x=3).result(WAIT)) == (4, 6)

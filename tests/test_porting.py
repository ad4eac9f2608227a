"""Ray 0.8 code that runs unchanged: three-method connector stores, classes served by method name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from werkzeug.test import Client

from serve_core import Serve
from serve_core.errors import MethodNotFoundError, ServeTypeError
from serve_core.kv.connector import ConnectorStore

MakeServe = Callable[..., Serve]


class Store08:
    """A store with only the 0.8 interface: get(key, default), put(key, value), as_dict()."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.writes: list[str] = []

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def put(self, key: str, value: Any) -> None:
        self.writes.append(key)
        self.data[key] = value

    def as_dict(self) -> dict[str, Any]:
        return dict(self.data)


def greet(request: Any, *, name: str = "world") -> str:
    return f"hello {name}"


class Counter:
    """No ``__call__``: served by its methods' names, as the original did."""

    def __init__(self, start: int = 0) -> None:
        self.count = start

    def incr(self, request: Any = None, *, by: int = 1) -> int:
        self.count += by
        return self.count

    def peek(self) -> int:
        return self.count


def test_a_three_method_connector_store_receives_every_write_and_restores(make_serve: MakeServe) -> None:
    store = Store08()
    # The 0.8 store has no signing key: its records are trusted unsigned only when asked.
    srv = make_serve(executor="inline", kv_store_connector=lambda namespace: store, allow_unsigned_store=True)
    srv.create_endpoint("greet", "/greet")
    srv.create_backend(greet, "greet:v1")
    srv.link("greet", "greet:v1")
    kinds = {"endpoint", "backend", "config", "traffic", "meta", "instance"}  # meta: revision, instance: heartbeat
    assert {key.split("/")[0] for key in store.writes} == kinds
    assert {"endpoint/greet", "backend/greet:v1", "config/greet:v1", "traffic/greet"} <= set(store.writes)
    srv.shutdown()
    again = make_serve(executor="inline", kv_store_connector=lambda namespace: store, allow_unsigned_store=True)
    assert again.restored.backends == ["greet:v1"]
    assert again.get_handle("greet").remote(name="0.8").result(0) == "hello 0.8"


def test_derived_delete_writes_a_tombstone_that_as_dict_leaves_out() -> None:
    store = Store08()
    adapted = ConnectorStore(store, "registry")
    adapted.update({"a": 1, "b": 2}, delete=[])
    adapted.delete("a")
    assert adapted.as_dict() == {"b": 2} and adapted.get("a", "gone") == "gone"
    assert adapted.namespace == "registry"
    adapted.close()  # no close on the store: nothing to do


def test_a_connector_store_without_the_three_methods_is_refused(make_serve: MakeServe) -> None:
    class NoAsDict:
        def get(self, key: str, default: Any = None) -> Any:
            return default

        def put(self, key: str, value: Any) -> None:
            pass

    with pytest.raises(ServeTypeError, match="has no as_dict"):
        make_serve(executor="inline", kv_store_connector=lambda namespace: NoAsDict())


@pytest.mark.parametrize("executor", ["inline", "thread", "process"])
def test_a_class_without_call_is_served_by_method_name(make_serve: MakeServe, executor: str) -> None:
    srv = make_serve(executor=executor)
    srv.create_endpoint("counter", "/counter")
    srv.create_backend(Counter, "counter:v1", 10)
    srv.link("counter", "counter:v1")
    handle = srv.get_handle("counter")
    assert handle.options(method_name="incr").remote(by=2).result(10) == 12
    with pytest.raises(MethodNotFoundError, match="its methods: incr, peek"):
        handle.remote().result(10)
    client = Client(srv.wsgi_app())
    assert client.get("/counter", headers={"X-SERVE-CALL-METHOD": "incr"}).text == "13"
    assert client.get("/counter", headers={"X-SERVE-CALL-METHOD": "peek"}).text == "13"
    missing = client.get("/counter")
    assert missing.status_code == 404 and "incr, peek" in missing.text


def test_stat_table_has_one_row_per_endpoint_and_backend() -> None:
    from serve_core.stat_table import stat_table

    stats = {
        "endpoint_ep_request_counter": 7, "endpoint_ep_error_counter": 1, "endpoint_ep_pending_size": 0,
        "b_1:v1_request_counter": 7, "b_1:v1_error_counter": 1,
        "backend_b_1:v1_queue_size": 2, "backend_b_1:v1_num_replicas": 3,
        "b_1:v1_latency_s_50th_perc_60_window": 0.0015, "b_1:v1_latency_s_99th_perc_60_window": 0.25,
    }
    lines = stat_table(stats, 60).splitlines()
    assert lines[0].split() == ["endpoint", "requests", "errors", "waiting"]
    assert lines[1].split() == ["ep", "7", "1", "0"]
    head = ["backend", "requests", "errors", "p50", "ms", "p90", "ms", "p99", "ms", "queue", "replicas"]
    assert lines[3].split() == head
    assert lines[4].split() == ["b_1:v1", "7", "1", "1.5", "-", "250.0", "2", "3"]
    assert "last 60 s" in lines[-1]


def test_http_stat_takes_percentiles_and_windows(make_serve: MakeServe) -> None:
    srv = make_serve(executor="inline")
    srv.create_endpoint("greet")
    srv.create_backend(greet, "greet:v1")
    srv.link("greet", "greet:v1")
    srv.get_handle("greet").remote().result(0)
    client = Client(srv.wsgi_app())
    stats = client.get("/-/stat?percentiles=50,99&windows=60").json
    assert stats is not None
    keys = [key for key in stats if "_latency_s_" in key]
    assert sorted(keys) == ["greet:v1_latency_s_50th_perc_60_window", "greet:v1_latency_s_99th_perc_60_window"]
    assert client.get("/-/stat?windows=soon").status_code == 400
    assert client.get("/-/stat?windows=7200").status_code == 400  # longer than gc_window_seconds


def test_a_shard_key_header_pins_the_split_over_http(make_serve: MakeServe) -> None:
    srv = make_serve(executor="inline")
    srv.create_endpoint("ep", "/ep")
    srv.create_backend(lambda request: "a", "a")
    srv.create_backend(lambda request: "b", "b")
    srv.split("ep", {"a": 0.5, "b": 0.5})
    client = Client(srv.wsgi_app())
    pinned = {client.get("/ep", headers={"X-SERVE-SHARD-KEY": "user-1"}).text for _ in range(30)}
    assert len(pinned) == 1
    spread = {client.get("/ep", headers={"X-SERVE-SHARD-KEY": f"user-{n}"}).text for n in range(40)}
    assert spread == {"a", "b"}
    assert client.get("/ep", headers={"X-SERVE-SHARD-KEY": "k" * 257}).status_code == 400

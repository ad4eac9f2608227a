"""The seed's flow end to end through handles, on every executor."""

from __future__ import annotations

from serve_core import Serve

from .conftest import WAIT


def test_seed_flow(srv: Serve) -> None:
    srv.create_endpoint("my_endpoint", "/echo")

    def echo_v1(flask_request, response="hello from python!"):
        return response

    def echo_v2(flask_request):
        return "something new"

    srv.create_backend(echo_v1, "echo:v1")
    srv.link("my_endpoint", "echo:v1")
    handle = srv.get_handle("my_endpoint")
    assert handle.remote(response="hi").result(WAIT) == "hi"
    srv.create_backend(echo_v2, "echo:v2")
    srv.split("my_endpoint", {"echo:v1": 0.5, "echo:v2": 0.5})
    answers = {handle.remote().result(WAIT) for _ in range(50)}
    assert answers == {"hello from python!", "something new"}
    for tag in ("echo:v1", "echo:v2"):
        config = srv.get_backend_config(tag)
        config.num_replicas = 2
        srv.set_backend_config(tag, config)
        assert srv.get_backend_config(tag).num_replicas == 2
    stats = srv.stat()
    assert stats["echo:v1_error_counter"] == 0
    assert stats["echo:v1_request_counter"] + stats["echo:v2_request_counter"] == 51
    assert "echo:v1_latency_s_50th_perc_10_window" in stats

"""Web requests reach replicas on every executor (the request crosses threads, processes, actors)."""

from __future__ import annotations

import json

import serve_core as serve
from serve_core import BackendConfig, Serve

from .helpers import InProcess


def describe(request):
    return {
        "web": serve.context.web,
        "method": request.method,
        "path": request.path,
        "args": request.args.to_dict(),
        "json": request.get_json(silent=True),
        "header": request.headers.get("X-Custom"),
    }


@serve.accept_batch
def describe_batch(requests):
    return [(serve.context.batch_size, r.get_json()["i"]) for r in requests]


def test_request_reaches_the_backend(srv: Serve) -> None:
    srv.create_endpoint("d", "/d", methods=["POST"])
    srv.create_backend(describe, "d:v1")
    srv.link("d", "d:v1")
    reply = InProcess(srv).request("POST", "/d?x=1", json={"k": [1, 2]}, headers={"X-Custom": "yes"})
    assert reply.status == 200, reply.text
    assert json.loads(reply.body) == {
        "web": True, "method": "POST", "path": "/d", "args": {"x": "1"}, "json": {"k": [1, 2]}, "header": "yes",
    }


def test_web_batches(srv: Serve) -> None:
    srv.create_endpoint("b", "/b", methods=["POST"])
    srv.create_backend(describe_batch, "b:v1", backend_config=BackendConfig(max_batch_size=4))
    srv.link("b", "b:v1")
    reply = InProcess(srv).request("POST", "/b", json={"i": 7})
    assert reply.status == 200, reply.text
    assert json.loads(reply.body) == [1, 7]


def test_base_exception_from_a_backend_is_a_500(srv: Serve) -> None:
    def exits(request):
        raise SystemExit(3)

    srv.create_endpoint("x", "/x")
    srv.create_backend(exits, "x:v1")
    srv.link("x", "x:v1")
    reply = InProcess(srv).request("GET", "/x")
    assert reply.status == 500
    assert "Traceback" not in reply.text

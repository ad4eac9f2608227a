"""A deployment script run in a subprocess by the restart tests (``python -m tests.kv.child``).

``build URL``: init on the store, deploy (a no-op when the store already holds the same
deployment), print ``READY <json>``, then wait to be killed.
``fill URL PREFIX N``: print ``READY``, wait for ``GO`` on stdin, create N endpoints and
backends, print ``DONE`` and exit.
``race URL PREFIX N``: like ``fill``, but endpoint ``<PREFIX>i`` claims route ``/race/i``, which
the other racer claims too; prints ``DONE <routes won>``.
``driver URL [PORT]``: the original's second driver: init on the store (serving on PORT, taken
by the first driver: it attaches), create, link and exit.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from serve_core import BackendConfig, ConflictError, Serve
from tests.kv.backends import Greeter, echo, make_shout


def deploy(srv: Serve) -> None:
    """The deployment: an endpoint with a route and methods, two backends split 70/30."""
    srv.create_endpoint("api", "/api", methods=["GET", "POST"])
    config = BackendConfig(num_replicas=2, max_batch_size=4)
    srv.create_backend(Greeter, "greet:v1", "hello", backend_config=config)
    srv.create_backend(make_shout("!"), "shout:v1")
    srv.split("api", {"greet:v1": 0.7, "shout:v1": 0.3})


def build(url: str) -> None:
    srv = Serve(kv_store_path=url, start_server=False)
    deploy(srv)
    state: dict[str, Any] = {
        "restored": srv.restored.backends,
        "num_replicas": srv.get_backend_config("greet:v1").num_replicas,
        "traffic": srv.get_traffic_policy("api"),
    }
    print("READY", json.dumps(state), flush=True)
    sys.stdin.readline()  # wait for SIGKILL (or the parent closing stdin)


def fill(url: str, prefix: str, count: int) -> None:
    srv = Serve(kv_store_path=url, start_server=False)
    print("READY", flush=True)
    sys.stdin.readline()
    for i in range(count):
        srv.create_endpoint(f"{prefix}{i}", f"/{prefix}/{i}")
        srv.create_backend(echo, f"{prefix}{i}:v1")
        srv.link(f"{prefix}{i}", f"{prefix}{i}:v1")
    srv.shutdown()
    print("DONE", flush=True)


def race(url: str, prefix: str, count: int) -> None:
    srv = Serve(kv_store_path=url, start_server=False, executor="inline")
    print("READY", flush=True)
    sys.stdin.readline()
    won = []
    for i in range(count):
        try:
            srv.create_endpoint(f"{prefix}{i}", f"/race/{i}")
        except ConflictError:
            continue
        won.append(i)
    srv.shutdown()
    print("DONE", json.dumps(won), flush=True)


def driver(url: str, port: str | None) -> None:
    import serve_core as serve

    if port is None:
        serve.init(kv_store_path=url, start_server=False)
    else:
        serve.init(kv_store_path=url, http_port=int(port))

    def driver(flask_request: Any) -> str:
        return "OK!"

    serve.create_endpoint("driver", "/driver")
    serve.create_backend(driver, "driver")
    serve.link("driver", "driver")
    print("DONE", flush=True)
    serve.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(sys.argv[2])
    elif sys.argv[1] == "driver":
        driver(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
    elif sys.argv[1] == "race":
        race(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        fill(sys.argv[2], sys.argv[3], int(sys.argv[4]))

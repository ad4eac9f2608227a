"""A deployment script run in a subprocess by the restart tests (``python -m tests.kv.child``).

``build URL``: init on the store, deploy (a no-op when the store already holds the same
deployment), print ``READY <json>``, then wait to be killed.
``fill URL PREFIX N``: print ``READY``, wait for ``GO`` on stdin, create N endpoints and
backends, print ``DONE`` and exit.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from serve_core import BackendConfig, Serve
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


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(sys.argv[2])
    else:
        fill(sys.argv[2], sys.argv[3], int(sys.argv[4]))

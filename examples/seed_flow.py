"""The seed's flow from Python, without HTTP: two echo backends, a 50/50 split, replicas, stat.

Run: python examples/seed_flow.py
"""

from __future__ import annotations

import json

import serve_core as serve


def echo_v1(flask_request, response="hello from python!"):
    if serve.context.web:
        response = flask_request.url
    return response


def echo_v2(flask_request):
    return "something new"


def main() -> None:
    serve.init(start_server=False)
    serve.create_endpoint("my_endpoint", "/echo")
    serve.create_backend(echo_v1, "echo:v1")
    config_v1 = serve.get_backend_config("echo:v1")
    serve.link("my_endpoint", "echo:v1")
    handle = serve.get_handle("my_endpoint")
    print("echo:v1 says:", handle.remote(response="hi").result(timeout=10))

    serve.create_backend(echo_v2, "echo:v2")
    config_v2 = serve.get_backend_config("echo:v2")
    serve.split("my_endpoint", {"echo:v1": 0.5, "echo:v2": 0.5})
    answers = [handle.remote().result(timeout=10) for _ in range(10)]
    print("split 50/50:", answers)

    for tag, config in (("echo:v1", config_v1), ("echo:v2", config_v2)):
        config.num_replicas = 2
        serve.set_backend_config(tag, config)
    print("stat:", json.dumps(serve.stat(percentiles=[50, 99], agg_windows_seconds=[60]), indent=2))
    serve.shutdown()


if __name__ == "__main__":
    main()

"""The seed's flow as a deployment file: ``serve-core run examples/echo.py``.

``serve-core run`` has already called ``serve.init()`` (thread executor, SQLite store,
HTTP on 127.0.0.1:8000); this file only declares endpoints and backends. Then::

    curl http://127.0.0.1:8000/echo          # the URL, from echo:v1 or "something new" from echo:v2
    curl http://127.0.0.1:8000/-/routes      # {"/echo": ["my_endpoint", ["GET"]]}
    serve-core stat                          # metrics of the running server
"""

import serve_core as serve

serve.create_endpoint("my_endpoint", "/echo")


def echo_v1(flask_request, response="hello from python!"):
    """Web calls get their own URL back; Python calls get ``response``."""
    return flask_request.url if serve.context.web else response


def echo_v2(flask_request):
    return "something new"


serve.create_backend(echo_v1, "echo:v1")
serve.link("my_endpoint", "echo:v1")
print(serve.get_handle("my_endpoint").remote(response="hello from a handle").result())

serve.create_backend(echo_v2, "echo:v2")
serve.split("my_endpoint", {"echo:v1": 0.5, "echo:v2": 0.5})  # half the traffic to each

for tag in ("echo:v1", "echo:v2"):  # two replicas each
    config = serve.get_backend_config(tag)
    config.num_replicas = 2
    serve.set_backend_config(tag, config)

print({key: value for key, value in serve.stat().items() if key.endswith("_counter")})

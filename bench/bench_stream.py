"""Streaming throughput over HTTP: ``python -m bench.bench_stream [--rounds N] [--executors thread process ray]``.

A generator of 10,000 small items (``"token 00042\\n"``), read whole by one HTTP client, as
items per second: streamed by a serve_core backend (each item encoded by the stream rules and
written as it comes, several per chunk when several are ready) against a bare Werkzeug
streaming response (``Response(generator)``: one chunk per item) of the same generator, both
served by the same standalone server (serve_core's ``HTTPServer``, the bare app mounted next to
the serve app), in interleaved rounds of the same run. The ratio is serve's items/s over the
bare response's (the issue's target: >= 0.5x).
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import time
from collections.abc import Iterator
from typing import Any

from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.wrappers import Response

from serve_core import Serve
from serve_core.http.server import HTTPServer

ITEMS = 10_000


def tokens(request: Any = None) -> Iterator[str]:
    for i in range(ITEMS):
        yield f"token {i:05d}\n"


def bare_app(environ: dict[str, Any], start_response: Any) -> Any:
    """The baseline: Werkzeug's own streaming response of the same generator."""
    return Response(tokens(), mimetype="text/plain")(environ, start_response)


def read(port: int, path: str) -> float:
    """Seconds to read the whole body of ``GET path`` (checked: every item arrived)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        started = time.perf_counter()
        conn.request("GET", path)
        body = conn.getresponse().read()
        seconds = time.perf_counter() - started
    finally:
        conn.close()
    arrived = body.count(b"\n")
    if arrived != ITEMS:
        raise RuntimeError(f"{path}: {arrived} items arrived of {ITEMS}")
    return seconds


def measure(executor: str, rounds: int) -> dict[str, float]:
    with Serve(executor=executor, start_server=False) as srv:
        srv.create_endpoint("tokens", "/tokens")
        srv.create_backend(tokens, "tokens:v1")
        srv.link("tokens", "tokens:v1")
        app = DispatcherMiddleware(srv.wsgi_app(), {"/bare": bare_app})
        server = HTTPServer(app, "127.0.0.1", 0)
        try:
            for path in ("/bare/", "/tokens"):  # warm-up
                read(server.port, path)
            bare, served = [], []
            for index in range(rounds):
                order = [("/bare/", bare), ("/tokens", served)]
                for path, samples in order if index % 2 == 0 else order[::-1]:
                    samples.append(ITEMS / read(server.port, path))
        finally:
            server.close()
    bare_rate, serve_rate = statistics.median(bare), statistics.median(served)
    return {"bare": bare_rate, "serve": serve_rate, "ratio": serve_rate / bare_rate}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--executors", nargs="+", default=["thread", "process"])
    args = parser.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.2f}; {ITEMS} items per response, median of {args.rounds} rounds")
    for executor in args.executors:
        result = measure(executor, args.rounds)
        print(
            f"{executor:8s} bare Werkzeug {result['bare']:10,.0f} items/s   serve_core {result['serve']:10,.0f} "
            f"items/s   ratio {result['ratio']:.2f}x"
        )


if __name__ == "__main__":
    main()

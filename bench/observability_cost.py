"""What metrics, request ids and the access log add to one HTTP request, measured in-process.

Usage::

    python -m bench.observability_cost [--rounds N] [--pin CPU]

The no-op endpoint on the inline executor (the whole request in this thread, no hand-off to
wake), called through the WSGI app with a prepared environ; five instances side by side: all
off, each part alone, all on. Rounds alternate between them; the report gives the median
per-request time and the median per-round ratio to "off", and the function calls per
request (a work measure that machine load cannot skew). Not a test: nothing is asserted.

``bench/http_load.py --compare observability`` measures the same over real HTTP under Granian;
this script says where the difference comes from.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from werkzeug.test import EnvironBuilder

from serve_core import Serve
from serve_core.http.accesslog import ACCESS_LOGGER, configure_access_log
from serve_core.prom import MetricsConfig

App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
VARIANTS: dict[str, tuple[MetricsConfig, bool]] = {  # name -> (config, access log on)
    "off": (MetricsConfig(enabled=False, request_ids=False, server_timing=False), False),
    "metrics": (MetricsConfig(request_ids=False, server_timing=False), False),
    "ids+timing": (MetricsConfig(enabled=False), False),
    "access log": (MetricsConfig(enabled=False, request_ids=False, server_timing=False), True),
    "all on": (MetricsConfig(), True),
}


def noop() -> bytes:
    return b"Hello, World!"


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
    return None


def _instance(config: MetricsConfig) -> Serve:
    srv = Serve(executor="inline", start_server=False, metrics=config)
    srv.create_endpoint("noop", "/noop")
    srv.create_backend(noop, "noop:v1")
    srv.link("noop", "noop:v1")
    return srv


def _timed(app: App, environ: dict[str, Any], loops: int) -> float:
    started = time.process_time()
    for _ in range(loops):
        app(dict(environ), _start_response)
    return (time.process_time() - started) / loops


def _calls(app: App, environ: dict[str, Any], loops: int = 200) -> float:
    count = [0]

    def profile(frame: object, event: str, arg: object) -> None:
        if event in ("call", "c_call"):
            count[0] += 1

    sys.setprofile(profile)
    try:
        for _ in range(loops):
            app(dict(environ), _start_response)
    finally:
        sys.setprofile(None)
    return count[0] / loops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--loops", type=int, default=1000, help="requests per round and variant")
    parser.add_argument("--pin", type=int, metavar="CPU", help="run on this CPU only")
    args = parser.parse_args()
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})
    access = logging.getLogger(ACCESS_LOGGER)
    handler = configure_access_log("text", io.StringIO())
    instances = {name: _instance(config) for name, (config, _) in VARIANTS.items()}
    environ = EnvironBuilder(path="/noop").get_environ()
    try:
        apps = {name: srv.wsgi_app() for name, srv in instances.items()}

        def run(name: str, loops: int) -> float:
            access.setLevel(logging.INFO if VARIANTS[name][1] else logging.WARNING)
            return _timed(apps[name], environ, loops)

        for name in apps:
            run(name, args.loops)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in apps}
        for index in range(args.rounds):
            for name in apps if index % 2 == 0 else reversed(list(apps)):
                times[name].append(run(name, args.loops))
            handler.stream = io.StringIO()  # the queued lines are written and dropped
        calls = {}
        for name in apps:
            access.setLevel(logging.INFO if VARIANTS[name][1] else logging.WARNING)
            calls[name] = _calls(apps[name], environ)
        print(f"{'variant':<12} {'CPU per request':>16} {'ratio to off':>13} {'calls per request':>18}")
        for name, samples in times.items():
            ratio = statistics.median(a / b for a, b in zip(samples, times["off"]))
            print(f"{name:<12} {statistics.median(samples) * 1e6:13.2f} us {ratio:12.3f}x {calls[name]:18.0f}")
        print(f"load average (1 min) {os.getloadavg()[0]:.2f}")
    finally:
        access.removeHandler(handler)
        handler.close()
        for srv in instances.values():
            srv.shutdown()


if __name__ == "__main__":
    main()

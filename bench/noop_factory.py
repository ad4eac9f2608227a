"""App factory of ``http_load.py --compare observability``: the no-op endpoint with the
observability of issue 13 all on, or all off (``BENCH_OBSERVABILITY=on|off``).

On: Prometheus metrics recorded, request ids, ``Server-Timing``, and the access log
written as text to the file ``$BENCH_ACCESS_LOG`` (one line per request, flushed as the
standard ``StreamHandler`` does). Off: ``MetricsConfig(enabled=False, request_ids=False,
server_timing=False)`` and no access log handler.
"""

from __future__ import annotations

import os
import runpy
from pathlib import Path
from typing import Any

import serve_core as serve
from serve_core.http.accesslog import configure_access_log
from serve_core.prom import MetricsConfig

NOOP = Path(__file__).resolve().parent / "noop_app.py"


PARTS = {  # BENCH_OBSERVABILITY: the parts each setting turns on (on and off are what the benchmark compares)
    "on": ("metrics", "ids", "log"),
    "off": (),
    "metrics": ("metrics",),
    "ids": ("ids",),
    "log": ("log",),
}


def app() -> Any:
    parts = PARTS[os.environ.get("BENCH_OBSERVABILITY", "on")]
    if "log" in parts:
        configure_access_log("text", open(os.environ.get("BENCH_ACCESS_LOG", os.devnull), "a"))  # noqa: SIM115
    ids = "ids" in parts
    config = MetricsConfig(enabled="metrics" in parts, request_ids=ids, server_timing=ids)
    serve.init(start_server=False, executor="thread", metrics=config)
    runpy.run_path(str(NOOP))
    return serve.wsgi_app()


def rsgi_app() -> Any:
    """The same for Granian's RSGI interface (what ``serve-core run --server granian`` serves)."""
    from serve_core.http.rsgi import RSGIApp

    return RSGIApp(app())

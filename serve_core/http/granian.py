"""Running the HTTP front under Granian (``pip install serve-core[granian]``).

Granian is a Rust HTTP server; its worker process imports the app itself, so under
``serve-core run --server granian`` the worker (not the command's process) initialises
serve and executes the deployment file, through :func:`app_from_env`. The same factory
serves any Granian or gunicorn setup::

    SERVE_CORE_APP=examples/echo.py granian --interface wsgi --factory \\
        serve_core.http.granian:app_from_env

One worker process hosts one serve instance (replicas, queues, metrics). With several
workers (``serve-core run --server granian --workers N``, or ``gunicorn -w N`` on the same
factory) each worker is an instance of its own on the shared store: they converge on one
registry (docs/sharing.md), while queues and metrics stay per worker.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
from typing import Any

from .server import is_loopback

log = logging.getLogger("serve_core.http")

ENV_APP = "SERVE_CORE_APP"
ENV_EXECUTOR = "SERVE_CORE_EXECUTOR"
ENV_KV_STORE = "SERVE_CORE_KV_STORE"
ENV_DEBUG = "SERVE_CORE_DEBUG"
ENV_MAX_BODY_BYTES = "SERVE_CORE_MAX_BODY_BYTES"
ENV_REQUEST_TIMEOUT = "SERVE_CORE_REQUEST_TIMEOUT"  # seconds; 0 for no limit
ENV_DRAIN_TIMEOUT = "SERVE_CORE_DRAIN_TIMEOUT"  # seconds
ENV_URL = "SERVE_CORE_URL"  # for the banner printed by the worker
ENV_LOG_FORMAT = "SERVE_CORE_LOG_FORMAT"  # "text" or "json": the worker writes the access log; unset: it does not
# Threads running WSGI calls; each waits for its call's result, so this bounds concurrency.
GRANIAN_THREADS = 32


def app_from_env() -> Any:
    """WSGI app factory: init serve, execute ``$SERVE_CORE_APP``, return ``serve.wsgi_app()``."""
    import serve_core as serve
    from serve_core.cli import app_search_path, deploy_file, describe
    from serve_core.serve import DEFAULT_DRAIN_TIMEOUT_S, DEFAULT_HTTP_REQUEST_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES

    log_format = os.environ.get(ENV_LOG_FORMAT)
    if log_format:
        from .accesslog import configure_access_log

        configure_access_log(log_format)
    app_file = os.environ.get(ENV_APP)
    if app_file:
        app_search_path(app_file)
    instance = serve.init(
        start_server=False,
        executor=os.environ.get(ENV_EXECUTOR, "thread"),
        kv_store_path=os.environ.get(ENV_KV_STORE) or None,
        debug=os.environ.get(ENV_DEBUG) == "1",
        max_body_bytes=int(os.environ.get(ENV_MAX_BODY_BYTES, DEFAULT_MAX_BODY_BYTES)),
        http_request_timeout_s=float(os.environ.get(ENV_REQUEST_TIMEOUT, DEFAULT_HTTP_REQUEST_TIMEOUT_S)) or None,
        drain_timeout_s=float(os.environ.get(ENV_DRAIN_TIMEOUT, DEFAULT_DRAIN_TIMEOUT_S)),
    )
    atexit.register(serve.shutdown)  # replica threads are daemons; this drains them
    if app_file:
        for note in deploy_file(instance, app_file):
            print(f"serve-core: {note}", flush=True)
        print(describe(instance, os.environ.get(ENV_URL, "")), flush=True)
    return instance.wsgi_app()


def run_granian(args: argparse.Namespace) -> int:
    """Serve ``args.app`` with Granian until SIGINT/SIGTERM; returns the exit code."""
    try:
        from granian import Granian
        from granian.constants import Interfaces
    except ImportError:
        print("serve-core: --server granian needs Granian: pip install 'serve-core[granian]'")
        return 2
    os.environ[ENV_APP] = os.path.abspath(args.app)
    os.environ[ENV_EXECUTOR] = args.executor
    os.environ[ENV_KV_STORE] = args.kv_store or ""
    os.environ[ENV_DEBUG] = "1" if args.debug else "0"
    os.environ[ENV_MAX_BODY_BYTES] = str(args.max_body_bytes)
    os.environ[ENV_REQUEST_TIMEOUT] = str(args.request_timeout or 0)
    os.environ[ENV_DRAIN_TIMEOUT] = str(args.drain_timeout)
    os.environ[ENV_URL] = f"http://{args.host}:{args.port}"
    os.environ[ENV_LOG_FORMAT] = args.log_format
    if not is_loopback(args.host):
        log.warning(
            "serving HTTP on non-loopback address %s without authentication",
            repr(args.host) if args.host else "'' (every interface)",
        )
    Granian(
        "serve_core.http.granian:app_from_env",
        address=args.host,
        port=args.port,
        interface=Interfaces.WSGI,
        factory=True,
        workers=args.workers,
        blocking_threads=GRANIAN_THREADS,
        log_access=False,
    ).serve()
    return 0

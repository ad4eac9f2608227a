"""Running the HTTP front under Granian (``pip install serve-core[granian]``).

Granian is a Rust HTTP server; its worker process imports the app itself, so under
``serve-core run --server granian`` the worker (not the command's process) initialises
serve and executes the deployment file, through :func:`rsgi_app_from_env`: Granian's RSGI
interface over :class:`~.rsgi.RSGIApp`, where a request waiting for its body or its result
holds no thread (docs/http.md, "Under Granian"). The WSGI app is still there for any WSGI
server, through :func:`app_from_env`::

    SERVE_CORE_APP=examples/echo.py granian --interface wsgi --factory \\
        serve_core.http.granian:app_from_env

What protects the worker (:func:`granian_options`): the whole request head within
:data:`HEAD_TIMEOUT_S` (Granian closes the connection past it, and a kept connection that
sends no new request within it), the body deadline of :mod:`.rsgi`, and a connection cap
(Granian's ``backpressure``) from the open-file limit, which is raised first: Granian keeps
a connection that never sends a byte until the client closes it, and stops accepting once
``backpressure`` connections are open.

One worker process hosts one serve instance (replicas, queues, metrics). With several
workers (``serve-core run --server granian --workers N``, or ``gunicorn -w N`` on the WSGI
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
ENV_DASHBOARD = "SERVE_CORE_DASHBOARD"  # "1" on, "0" off, unset or empty: on for a loopback --host only
ENV_BODY_TIMEOUT = "SERVE_CORE_BODY_TIMEOUT"  # seconds before a body's rate allowance (rsgi.BODY_TIMEOUT_S)
HEAD_TIMEOUT_S = 10.0
"""Granian's ``header_read_timeout``: a request head (or a kept connection's next one) within this, else closed."""

MAX_OPEN_FILES = 65_536
"""The open-file limit :func:`connection_cap` raises the soft limit to (at most the hard limit)."""

FILES_RESERVED = 512
"""Descriptors the connection cap leaves to the instance (store, logs, process replicas' pipes)."""


def app_from_env() -> Any:
    """WSGI app factory: init serve, execute ``$SERVE_CORE_APP``, return ``serve.wsgi_app()``."""
    return _instance_from_env().wsgi_app()


def rsgi_app_from_env() -> Any:
    """RSGI app factory (what ``serve-core run --server granian`` serves): :class:`~.rsgi.RSGIApp`."""
    from .rsgi import BODY_TIMEOUT_S, RSGIApp

    body_timeout_s = float(os.environ.get(ENV_BODY_TIMEOUT) or BODY_TIMEOUT_S)
    return RSGIApp(_instance_from_env().wsgi_app(), body_timeout_s=body_timeout_s)


def _instance_from_env() -> Any:
    """Init serve from the ``SERVE_CORE_*`` variables and execute ``$SERVE_CORE_APP`` on it."""
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
        dashboard=dashboard_option(os.environ.get(ENV_DASHBOARD, "")),
    )
    atexit.register(serve.shutdown)  # replica threads are daemons; this drains them
    if app_file:
        for note in deploy_file(instance, app_file):
            print(f"serve-core: {note}", flush=True)
        print(describe(instance, os.environ.get(ENV_URL, "")), flush=True)
    return instance


DASHBOARD_CHOICES = {"auto": None, "": None, "on": True, "1": True, "off": False, "0": False}
"""``serve-core run --dashboard`` and ``$SERVE_CORE_DASHBOARD`` values, as ``Serve(dashboard=...)``."""


def dashboard_option(value: str) -> bool | None:
    """``Serve(dashboard=...)`` for a ``--dashboard`` / ``$SERVE_CORE_DASHBOARD`` value.

    Raises:
        ValueError: not one of :data:`DASHBOARD_CHOICES`.
    """
    key = value.strip().lower()
    if key not in DASHBOARD_CHOICES:
        raise ValueError(f"{ENV_DASHBOARD} must be on, off or auto (or 1, 0, empty), got {value!r}")
    return DASHBOARD_CHOICES[key]


def connection_cap() -> int | None:
    """Granian's ``backpressure`` for one worker: the connections it holds open at once.

    Raises the soft open-file limit to :data:`MAX_OPEN_FILES` (or the hard limit), inherited
    by the workers, and leaves :data:`FILES_RESERVED` of it to the instance. ``None`` where
    there are no such limits (Windows): Granian's default (1,024) then.
    """
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MAX_OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, wanted, exc)
    if soft == resource.RLIM_INFINITY:
        soft = MAX_OPEN_FILES
    return max(soft - FILES_RESERVED, soft // 2)


def granian_options(workers: int) -> dict[str, Any]:
    """What :func:`run_granian` gives Granian besides the address: interface, deadlines, cap."""
    from granian.constants import Interfaces
    from granian.http import HTTP1Settings

    options: dict[str, Any] = {
        "interface": Interfaces.RSGI,
        "factory": True,
        "workers": workers,
        "websockets": False,
        "http1_settings": HTTP1Settings(header_read_timeout=int(HEAD_TIMEOUT_S * 1000)),
        "log_access": False,  # the worker writes its own access log (--log-format)
    }
    cap = connection_cap()
    if cap is not None:
        options["backpressure"] = cap
    return options


def run_granian(args: argparse.Namespace) -> int:
    """Serve ``args.app`` with Granian until SIGINT/SIGTERM; returns the exit code."""
    try:
        from granian import Granian
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
    os.environ[ENV_DASHBOARD] = args.dashboard
    if not is_loopback(args.host):
        log.warning(
            "serving HTTP on non-loopback address %s without authentication",
            repr(args.host) if args.host else "'' (every interface)",
        )
    options = granian_options(args.workers)
    Granian("serve_core.http.granian:rsgi_app_from_env", address=args.host, port=args.port, **options).serve()
    return 0

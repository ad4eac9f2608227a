"""The ``serve-core`` command.

``serve-core run APP.py`` initialises serve, executes the deployment file (which uses the
module-level API: ``create_endpoint``, ``create_backend``, ``link``…), prints the routes and
the address, and serves until SIGINT/SIGTERM, then drains and shuts down (exit code 0).
``serve-core routes --url URL`` and ``serve-core stat --url URL`` query a running server.
``serve-core status``, ``split``, ``scale`` and ``deploy`` work on a store (``--kv-store``):
every instance serving from it applies their changes.

Errors are one line on stderr (a traceback with ``--debug``): exit code 2 for usage, 1 otherwise.
"""

from __future__ import annotations

import argparse
import builtins
import json
import math
import os
import signal
import sys
import threading
import traceback
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .kv import DEFAULT_CLI_STORE
from .serve import DEFAULT_DRAIN_TIMEOUT_S, DEFAULT_HTTP_REQUEST_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES
from .stat_table import TABLE_PERCENTILES, stat_table


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="serve-core", description=__doc__.split("\n\n")[0].replace("``", ""))
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="serve a deployment file over HTTP")
    run.add_argument("app", help="Python file creating endpoints and backends with the module API")
    run.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    run.add_argument("--port", type=int, default=8000, help="port (0 picks a free one; default: %(default)s)")
    run.add_argument("--executor", default="thread", help="replica executor (default: %(default)s)")
    run.add_argument("--kv-store", default=DEFAULT_CLI_STORE, help="SQLite path or SQLAlchemy URL")
    run.add_argument("--blocking", action="store_true", help="wait until the server answers before loading")
    run.add_argument("--server", choices=("werkzeug", "granian"), default="werkzeug", help="HTTP server")
    run.add_argument("--debug", action="store_true", help="tracebacks in HTTP 500 bodies (development only)")
    run.add_argument(
        "--max-body-bytes", type=_body_limit, default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body accepted, 413 past it (default: %(default)s)",
    )
    run.add_argument(
        "--request-timeout", type=_request_timeout, default=DEFAULT_HTTP_REQUEST_TIMEOUT_S, metavar="SECONDS",
        help="how long a request waits for its answer, 504 past it; 0 for no limit (default: %(default)s)",
    )
    run.add_argument(
        "--drain-timeout", type=_seconds, default=DEFAULT_DRAIN_TIMEOUT_S, metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long queued and running calls may finish (default: %(default)s)",
    )
    run.add_argument(
        "--dashboard", choices=("auto", "on", "off"), default="auto",
        help="the page at /-/dashboard: auto is on for a loopback --host only, since it has no "
        "authentication (default: %(default)s)",
    )
    run.add_argument("--workers", type=_positive, default=1, help="worker processes (granian only; default: 1)")
    run.add_argument(
        "--log-format", choices=("text", "json"), default="text",
        help="access log on stderr, one record per request: text lines or JSON objects (default: %(default)s)",
    )
    for name, help_text in (("routes", "print a running server's routes"), ("stat", "print its metrics")):
        query = commands.add_parser(name, help=help_text)
        query.add_argument("--url", default="http://127.0.0.1:8000", help="server URL (default: %(default)s)")
    stat = commands.choices["stat"]
    stat.add_argument("--window", type=_seconds, default=60.0, help="latency window in seconds (default: %(default)s)")
    stat.add_argument("--json", action="store_true", help="the full flat stat() dict instead of the table")
    status = _store_command(commands, "status", "list a store's live instances, endpoints, backends and traffic")
    status.add_argument("--json", action="store_true", help="the report as JSON")
    split = _store_command(commands, "split", "set an endpoint's traffic on every instance of a store")
    split.add_argument("endpoint")
    split.add_argument("weights", nargs="+", metavar="TAG=WEIGHT", type=_weight)
    scale = _store_command(commands, "scale", "set a backend's number of replicas on every instance of a store")
    scale.add_argument("tag")
    scale.add_argument("replicas", type=_positive, metavar="N")
    deploy = _store_command(commands, "deploy", "run a deployment file's registry calls on a store, serving nothing")
    deploy.add_argument("app", help="Python file creating endpoints and backends with the module API")
    return parser


def _store_command(commands: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    command: argparse.ArgumentParser = commands.add_parser(name, help=help_text)
    command.add_argument(
        "--kv-store", default=DEFAULT_CLI_STORE, help="SQLite path or SQLAlchemy URL (default: %(default)s)"
    )
    command.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    return command


def _positive(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return number


def _weight(text: str) -> tuple[str, float]:
    tag, sep, weight = text.rpartition("=")
    try:
        value = float(weight)
    except ValueError:
        value = math.nan
    if not sep or not tag or not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected TAG=WEIGHT with a weight >= 0, not {text!r}")
    return tag, value


def _body_limit(text: str) -> int:
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if limit < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of bytes, not {text!r}")
    return limit


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, not {text!r}")
    return seconds


def _label(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def _request_timeout(text: str) -> float | None:
    """Seconds; 0 means no limit (``None``)."""
    return _seconds(text) or None


APP_MODULE = "__serve_core_app__"


def app_search_path(path: str) -> None:
    """Let the deployment file import its siblings, as ``python APP.py`` would.

    Done before ``init`` so that backends stored by import path from those siblings
    can be re-imported when the registry is restored.
    """
    folder = str(Path(path).resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)


def load_app(path: str) -> None:
    """Execute the user's deployment file (its errors propagate with their traceback).

    The file runs as a module that is *not* registered in ``sys.modules``: what it
    defines cannot be imported again by name (not by a worker process, not after a
    restart), so cloudpickle ships it by value and the store keeps it as a signed blob.
    """
    source = Path(path).read_bytes()
    namespace = {"__name__": APP_MODULE, "__file__": str(Path(path).resolve()), "__builtins__": builtins}
    exec(compile(source, path, "exec"), namespace)  # noqa: S102 - running the user's own file is the point


def deploy_file(instance: Any, path: str) -> list[str]:
    """Run the deployment file on a restarted instance: the store's traffic and configs win.

    Returns what was kept from the store instead of the file (one line each); see
    :meth:`serve_core.Serve.keep_store_state`.
    """
    with instance.keep_store_state() as notes:
        load_app(path)
    if notes:
        notes.insert(0, "kept from the store (changed at runtime since the file last deployed them):")
    return [f"  {note}" if i else note for i, note in enumerate(notes)]


def _report_file_error(path: str, exc: BaseException, debug: bool) -> None:
    """A ServeError raised by the file (a conflict, a bad route...) is one line; other errors keep their traceback."""
    from .errors import ServeError

    if debug or not isinstance(exc, ServeError):
        traceback.print_exception(exc)
        print(f"serve-core: error in {path}; shutting down", file=sys.stderr)
    else:
        print(f"serve-core: error in {path}: {type(exc).__name__}: {exc}", file=sys.stderr)


def _in_cli_words(message: str) -> str:
    """An error of ``init`` as the command's user typed it (``--port`` for ``http_port``...)."""
    for keyword, flag in (("http_port", "--port"), ("http_host", "--host"), ("kv_store_path", "--kv-store")):
        message = message.replace(keyword, flag)
    return message


def describe(serve: Any, url: str) -> str:
    """The startup banner: the address and the route table."""
    lines = [f"serve-core: serving on {url}  (stop with Ctrl-C)"]
    for route, (endpoint, methods) in sorted(serve.route_table().items()):
        lines.append(f"  {','.join(methods):<12} {url}{route}  -> {endpoint}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    if not Path(args.app).is_file():  # checked before a store is opened or a port bound
        print(f"serve-core: no such deployment file: {args.app}", file=sys.stderr)
        return 2
    if args.server == "granian":
        from .http.granian import run_granian

        return run_granian(args)
    if args.workers != 1:
        print("serve-core: --workers needs --server granian (or run gunicorn on an app factory)", file=sys.stderr)
        return 2
    import serve_core as serve

    from .http.accesslog import configure_access_log
    from .http.granian import DASHBOARD_CHOICES

    configure_access_log(args.log_format)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    app_search_path(args.app)
    try:
        instance = serve.init(
            http_host=args.host,
            http_port=args.port,
            executor=args.executor,
            kv_store_path=args.kv_store,
            blocking=args.blocking,
            debug=args.debug,
            max_body_bytes=args.max_body_bytes,
            http_request_timeout_s=args.request_timeout,
            drain_timeout_s=args.drain_timeout,
            dashboard=DASHBOARD_CHOICES[args.dashboard],
        )
    except serve.ServeError as exc:  # a taken port, an unreachable store...: one line (a traceback with --debug)
        if args.debug:
            traceback.print_exc()
        print(f"serve-core: {_in_cli_words(str(exc))}", file=sys.stderr)
        return 1
    try:
        notes = deploy_file(instance, args.app)
    except BaseException as exc:  # noqa: BLE001 - report any failure of the user's file
        _report_file_error(args.app, exc, args.debug)
        serve.shutdown()
        return 1
    host, port = instance.http_address() or (args.host, args.port)
    print(f"serve-core: registry kept in {args.kv_store}{_restored(instance)}", flush=True)
    for note in notes:
        print(f"serve-core: {note}", flush=True)
    print(describe(instance, f"http://{host}:{port}"), flush=True)
    stop.wait()
    print("serve-core: stopping (draining calls in flight)", flush=True)
    serve.shutdown()
    return 0


def _restored(instance: Any) -> str:
    report = instance.restored
    if not report:
        return ""
    failed = f", {len(report.failed)} could not be restored (see above)" if report.failed else ""
    return f" (restored {_count(len(report.endpoints), 'endpoint')}, {_count(len(report.backends), 'backend')}{failed})"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _query(url: str, path: str) -> Any:
    """The JSON a running server answers at ``path``, or ``None`` (reported on stderr)."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + path, timeout=10) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"serve-core: cannot query {url}: {exc}", file=sys.stderr)
        return None


def _print_query(args: argparse.Namespace) -> int:
    if args.command == "routes":
        data = _query(args.url, "/-/routes")
        text = None if data is None else json.dumps(data, indent=2, sort_keys=True)
    elif args.json:
        data = _query(args.url, "/-/stat")
        text = None if data is None else json.dumps(data, indent=2, sort_keys=True)
    else:
        window = _label(args.window)
        data = _query(args.url, f"/-/stat?percentiles={','.join(map(str, TABLE_PERCENTILES))}&windows={window}")
        text = None if data is None else stat_table(data, args.window).rstrip("\n")
    if text is None:
        return 1
    print(text)
    return 0


def _store_main(args: argparse.Namespace) -> int:
    """``status``, ``split``, ``scale``, ``deploy``: change or read the store, import no backend code."""
    from .errors import ServeError

    try:
        if args.command != "deploy" and _missing_sqlite_file(args.kv_store):
            print(f"serve-core: no store at {args.kv_store} (no such file; --kv-store names it)", file=sys.stderr)
            return 1
        if args.command == "status":
            return _status(args)
        if args.command == "deploy" and not Path(args.app).is_file():
            print(f"serve-core: no such deployment file: {args.app}", file=sys.stderr)
            return 2
        return _change_store(args)
    except ServeError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"serve-core: {_in_cli_words(str(exc))}", file=sys.stderr)
        return 1


def _missing_sqlite_file(kv_store: str) -> bool:
    from .kv import MEMORY_STORE_NAMES

    return "://" not in kv_store and kv_store not in MEMORY_STORE_NAMES and not Path(kv_store).exists()


def _status(args: argparse.Namespace) -> int:
    import time

    from .persistence import open_registry_store
    from .serve import DEFAULT_INSTANCE_EXPIRY_S
    from .status import format_status, status_report

    store = open_registry_store(args.kv_store, None)
    try:
        report = status_report(store, time.time(), DEFAULT_INSTANCE_EXPIRY_S)
    finally:
        store.close()
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else format_status(report))
    return 0


def _change_store(args: argparse.Namespace) -> int:
    import serve_core as serve

    if args.command == "deploy":
        app_search_path(args.app)
    instance = serve.init(kv_store_path=args.kv_store, start_server=False, run_replicas=False)
    try:
        if args.command == "split":
            instance.split(args.endpoint, dict(args.weights))
            print(f"serve-core: {args.endpoint}: {instance.get_traffic_policy(args.endpoint)}")
        elif args.command == "scale":
            config = instance.get_backend_config(args.tag)
            config.num_replicas = args.replicas
            instance.set_backend_config(args.tag, config)
            print(f"serve-core: {args.tag}: {args.replicas} replicas desired")
        else:
            try:
                load_app(args.app)
            except BaseException as exc:  # noqa: BLE001 - report any failure of the user's file
                _report_file_error(args.app, exc, args.debug)
                return 1
            print(f"serve-core: deployed {args.app} to {args.kv_store} (revision {instance.revision})")
    finally:
        serve.shutdown()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``serve-core`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command in ("status", "split", "scale", "deploy"):
        return _store_main(args)
    try:
        code = _print_query(args)
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped to head: the reader left, nothing to report
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's own flush at exit stays quiet
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())

"""The live dashboard: one read-only page at ``/-/dashboard`` and the JSON it polls.

Routes (under the app's mount point; every URL the page uses is relative, so it works under
any prefix):

=========================  ==============================================================
``/-/dashboard``           the page (HTML; its script and style below, nothing from the network)
``/-/dashboard/app.js``    the page's script: polls ``data`` every 1.5 s, draws SVG charts
``/-/dashboard/app.css``   its style
``/-/dashboard/data``      the JSON (``?since=N``: only history points after sequence ``N``)
=========================  ==============================================================

:class:`ServeApp` serves these among its built-in routes; :class:`DashboardApp` is also a WSGI
app of its own (``Serve.dashboard_app()``), answering the same paths (and ``/`` with a redirect
to the page) for users who serve it elsewhere. The files ship in ``serve_core/http/static``.

Whether it answers (``Serve(dashboard=...)``): ``True`` on, ``False`` off, ``None`` (default)
on only where the instance is known to listen on loopback alone — its standalone server's
address, or under ``serve-core run --server granian`` the ``--host`` the command passes its
workers. It shows routes, traffic, replica counts and error ids to whoever can reach it, and
serve_core has no authentication: on a public address that is for the operator to decide.
Mounted in another app, the instance cannot know what that app listens on, so ``None`` is off.

Recent errors are the instance's (:meth:`Serve.recent_errors`): every query a backend runtime
answered with an error, from handle and HTTP calls alike, with its endpoint, backend, kind and
error id. The HTTP front's 500s add their method and path: each logs ``"<method> <path> failed
(error id <id>)"`` on logger ``serve_core.http`` (:mod:`.responses`), with the id the runtime
gave the exception, and a handler kept here attaches the request to that record; a 500 that no
backend raised (the front itself failed) is kept here as its own entry. The exception's message
and traceback are shown only in debug mode.
"""

from __future__ import annotations

import collections
import importlib.resources
import logging
import os
import threading
import traceback
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import MethodNotAllowedError, NotFoundError, StoreError
from ..history import History
from ..recent_errors import type_name
from .granian import ENV_URL
from .request import ServeRequest
from .responses import PlainResponse, error_response, json_body
from .server import is_loopback

if TYPE_CHECKING:
    from ..config import BackendConfig
    from ..runtime import BackendRuntime
    from ..serve import Serve

PAGE = "/-/dashboard"
SCRIPT = "/-/dashboard/app.js"
STYLE = "/-/dashboard/app.css"
DATA = "/-/dashboard/data"
MAX_ERRORS = 50
"""Recent errors kept (the oldest drops out)."""
MAX_TRACEBACK_CHARS = 8_000
BATCH_WINDOW_S = 10.0  # the recent batch size shown is the median over this window

_ERROR_MESSAGE = "%s failed (error id %s)"  # the log record of responses.internal_error
_SECURITY_HEADERS = (
    # Everything comes from this app: a page that shows what an instance serves runs no one else's code.
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)
_FILES = {PAGE: ("dashboard.html", "text/html"), SCRIPT: ("app.js", "text/javascript"), STYLE: ("app.css", "text/css")}

Runtimes = Callable[[], "Mapping[str, BackendRuntime]"]
StartResponse = Callable[..., Any]


def dashboard_enabled(option: bool | None, http_address: tuple[str, int] | None, env: Mapping[str, str]) -> bool:
    """``Serve(dashboard=option)``'s rule (see the module docstring); ``env`` is ``os.environ``."""
    if option is not None:
        return option
    if http_address is not None:
        return is_loopback(http_address[0])
    url = env.get(ENV_URL, "")  # set by `serve-core run --server granian` for its workers
    return bool(url) and is_loopback(urlsplit(url).hostname or "")


class ErrorLog:
    """The last ``capacity`` errors, newest last; safe to read and append from any thread."""

    def __init__(self, capacity: int = MAX_ERRORS) -> None:
        self._errors: collections.deque[dict[str, Any]] = collections.deque(maxlen=capacity)
        self._lock = threading.Lock()

    def add(self, error: dict[str, Any]) -> None:
        with self._lock:
            self._errors.append(error)

    def recent(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._errors)


class _Capture(logging.Handler):
    """Feeds the 500s logged on ``serve_core.http`` to a dashboard, which it holds weakly.

    It is detached when the dashboard is collected (``weakref.finalize``); a stopped
    instance's handler ignores records until then.
    """

    def __init__(self, dashboard: DashboardApp) -> None:
        super().__init__(logging.ERROR)
        self._dashboard = weakref.ref(dashboard)

    def emit(self, record: logging.LogRecord) -> None:
        dashboard = self._dashboard()
        if dashboard is None or record.msg != _ERROR_MESSAGE or not isinstance(record.args, tuple):
            return
        if len(record.args) == 2 and dashboard.serve.state != "stopped":
            dashboard.record_error(str(record.args[0]), str(record.args[1]), record.created, record.exc_info)


class DashboardApp:
    """The dashboard of one instance, as routes for :class:`ServeApp` and as a WSGI app.

    Args:
        serve: the instance shown.
        runtimes: returns its backend runtimes by tag (``Serve`` passes its own).
        history: the sampler to read (default: a new one on the instance's clock, started
            unless the dashboard is off).
    """

    def __init__(self, serve: Serve, runtimes: Runtimes, history: History | None = None) -> None:
        self.serve = serve
        self._runtimes = runtimes
        self.history = history or History(
            serve, serve.clock, window_s=min(1.0, serve.gc_window_seconds), latency_counts=serve.metrics.latency_counts
        )
        self.errors = ErrorLog()
        self._files: dict[str, bytes] = {}
        self._instances: tuple[float, list[dict[str, Any]]] | None = None
        self.routes: dict[str, Callable[[ServeRequest], PlainResponse]] = {path: self._file for path in _FILES}
        self.routes[DATA] = self._data
        if serve.dashboard is not False:
            self.history.start(when=self.enabled)
            logger = logging.getLogger("serve_core.http")
            capture = _Capture(self)
            logger.addHandler(capture)
            weakref.finalize(self, logger.removeHandler, capture)

    def enabled(self) -> bool:
        """Whether the dashboard answers now (asked each time: the server's address comes after the app)."""
        return dashboard_enabled(self.serve.dashboard, self.serve.http_address(), os.environ)

    # ------------------------------------------------------------ WSGI
    def dispatch_request(self, request: ServeRequest) -> PlainResponse:
        """The response for one of the dashboard's paths (``/`` redirects to the page).

        Raises:
            NotFoundError: another path, or the dashboard is off. MethodNotAllowedError: not GET or HEAD.
        """
        if request.path == "/":
            return PlainResponse(b"", "text/plain", 302, (("Location", request.script_root + PAGE),))
        handler = self.routes.get(request.path)
        if handler is None:
            raise NotFoundError(f"no dashboard path {request.path!r}; the page is at {request.script_root}{PAGE}")
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowedError(
                f"the dashboard is read-only: method {request.method} is not allowed", ("GET", "HEAD")
            )
        return handler(request)

    def wsgi_app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        request = ServeRequest(environ)
        try:
            response = self.dispatch_request(request)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a response
            response = error_response(exc, debug=self.serve.debug, where=f"{request.method} {request.path}")
        return response(environ, start_response)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        return self.wsgi_app(environ, start_response)

    # ------------------------------------------------------------ routes
    def _check_enabled(self) -> None:
        if not self.enabled():
            raise NotFoundError(
                "the dashboard is off on this instance: it is not known to listen on loopback only; "
                "Serve(dashboard=True) turns it on (docs/dashboard.md says why it is off)"
            )

    def _file(self, request: ServeRequest) -> PlainResponse:
        self._check_enabled()
        name, kind = _FILES[request.path]
        body = self._files.get(name)
        if body is None:  # read once: the package's files do not change while it runs
            body = importlib.resources.files("serve_core.http").joinpath(f"static/{name}").read_bytes()
            self._files[name] = body
        return PlainResponse(body, f"{kind}; charset=utf-8", 200, _SECURITY_HEADERS)

    def _data(self, request: ServeRequest) -> PlainResponse:
        self._check_enabled()
        try:
            since = max(0, int(request.args.get("since", "0")))
        except ValueError:
            since = 0
        return PlainResponse(json_body(self.snapshot(since)), "application/json", 200, _SECURITY_HEADERS)

    # ------------------------------------------------------------ data
    def snapshot(self, since: int = 0) -> dict[str, Any]:
        """What ``/-/dashboard/data`` answers (docs/dashboard.md has the fields)."""
        serve = self.serve
        runtimes = self._runtimes()
        stats = serve.stat((50,), (min(BATCH_WINDOW_S, serve.gc_window_seconds),))
        instances = self._live_instances()
        configs = serve.list_backends()
        return {
            "version": 1,
            "time": serve.clock.wall(),
            "instance": {
                "id": serve.instance_id,
                "state": serve.state,
                "executor": serve.executor().name,
                "http": _address(serve.http_address()) or urlsplit(os.environ.get(ENV_URL, "")).netloc or None,
                "revision": serve.revision,
                "debug": serve.debug,
            },
            "interval_s": self.history.interval_s,
            "horizon_s": self.history.horizon_s,
            "endpoints": _endpoints(serve.list_endpoints(), stats),
            "backends": [
                self._backend(tag, config, runtimes.get(tag), stats, instances) for tag, config in configs.items()
            ],
            "instances": instances,
            "history": self.history.series(since),
            "errors": self._recent_errors(),
        }

    def _recent_errors(self) -> list[dict[str, Any]]:
        """The instance's recent errors and the front's own 500s, oldest first, at most :data:`MAX_ERRORS`."""
        errors = [_error_entry(error) for error in self.serve.recent_errors()] + self.errors.recent()
        errors.sort(key=lambda error: error["time"])
        return errors[-MAX_ERRORS:]

    def _backend(
        self,
        tag: str,
        stored: BackendConfig,
        runtime: BackendRuntime | None,
        stats: Mapping[str, float],
        instances: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """One backend: ``desired`` is what the runtime keeps (the autoscaler's count when it has one),
        ``running`` the replicas alive, ``ready`` those in service (taking calls)."""
        config = runtime.config if runtime is not None else stored
        load = runtime.load() if runtime is not None else None
        replicas = runtime.replicas() if runtime is not None else []
        window = f"{min(BATCH_WINDOW_S, self.serve.gc_window_seconds):g}"
        return {
            "tag": tag,
            "executor": config.executor or self.serve.executor().name,
            "max_batch_size": config.max_batch_size,
            "recent_batch_size": stats.get(f"{tag}_batch_size_50th_perc_{window}_window"),
            "desired": load.desired if load is not None else stored.num_replicas,
            "running": sum(1 for replica in replicas if replica.alive),
            "ready": load.running if load is not None else 0,
            "queue": load.queued if load is not None else 0,
            "in_flight": load.in_flight if load is not None else 0,
            "requests": int(stats.get(f"{tag}_request_counter", 0)),
            "errors": int(stats.get(f"{tag}_error_counter", 0)),
            "instances": {
                inst["id"]: inst["backends"].get(tag, {"desired": 0, "running": 0}) for inst in instances
            },
        }

    def _live_instances(self) -> list[dict[str, Any]]:
        """The store's live instances, read at most once a heartbeat period (a store read each)."""
        now = self.serve.clock.monotonic()
        if self._instances is not None and now - self._instances[0] < self.serve.heartbeat_s:
            return self._instances[1]
        wall = self.serve.clock.wall()
        try:
            records = self.serve.instances()
        except StoreError:
            records = []
        instances = [
            {**record.describe(wall), "this": record.instance_id == self.serve.instance_id} for record in records
        ]
        self._instances = (now, instances)
        return instances

    def record_error(self, where: str, error_id: str, when: float, exc_info: Any) -> None:
        """Keep one HTTP 500 (called by the log handler) when its path is one of this instance's routes.

        A backend's error is already among the instance's recent errors: it gets its request added.
        """
        method, _, path = where.partition(" ")
        if self.serve.annotate_error(error_id, method=method, path=path):
            return  # a backend's error: the instance keeps it, now with its request
        entry = self.serve.route_table().get(path)
        if entry is None:
            return  # another instance's path (several can log in one process), or not an endpoint's
        endpoint = entry[0]
        try:
            weights = self.serve.get_traffic_policy(endpoint)
        except NotFoundError:  # no traffic (any more)
            weights = {}
        exc = exc_info[1] if isinstance(exc_info, tuple) and len(exc_info) == 3 else None
        error: dict[str, Any] = {
            "time": when,
            "id": error_id,
            "method": method,
            "path": path,
            "endpoint": endpoint,
            "backend": " or ".join(sorted(tag for tag, weight in weights.items() if weight > 0)) or None,
            "kind": "front",
            "type": type_name(exc),
            "count": 1,
        }
        if self.serve.debug and exc is not None:
            error["message"] = str(exc)
            error["traceback"] = "".join(traceback.format_exception(exc))[-MAX_TRACEBACK_CHARS:]
        self.errors.add(error)

    def __repr__(self) -> str:
        return f"<DashboardApp {self.serve!r} {self.history!r}>"


def _endpoints(endpoints: Mapping[str, dict[str, Any]], stats: Mapping[str, float]) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "route": info["route"],
            "methods": info["methods"],
            "traffic": dict(info["traffic"] or {}),
            "requests": int(stats.get(f"endpoint_{name}_request_counter", 0)),
            "errors": int(stats.get(f"endpoint_{name}_error_counter", 0)),
            "waiting": int(stats.get(f"endpoint_{name}_pending_size", 0)),
        }
        for name, info in endpoints.items()
    ]


def _address(address: tuple[str, int] | None) -> str | None:
    return None if address is None else f"{address[0]}:{address[1]}"


def _error_entry(error: dict[str, Any]) -> dict[str, Any]:
    """A recent error of the instance in the page's shape (``id`` for ``error_id``)."""
    entry = {key: value for key, value in error.items() if key != "error_id"}
    entry["id"] = error["error_id"]
    return entry


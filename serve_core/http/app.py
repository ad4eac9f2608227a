"""``ServeApp``: the WSGI application of a serve instance.

It has Werkzeug's shape — a ``url_map`` (rebuilt when the registry's routes change), a
``dispatch_request`` turning a request into a response, a ``wsgi_app`` doing the WSGI
plumbing and a ``__call__`` that only delegates, so middleware can wrap ``wsgi_app`` —
and can be mounted anywhere, e.g. under a prefix with Werkzeug's ``DispatcherMiddleware``::

    app = DispatcherMiddleware(flask_app, {"/serve": serve.wsgi_app()})

Built-in routes under the reserved ``/-/`` prefix: ``/-/routes`` (``{route: [endpoint,
[methods]]}``), ``/-/healthz`` (200 while the instance runs), ``/-/readyz`` (200 once every endpoint
with traffic has a ready replica, else 503 naming what is not: ``Serve.readiness()``), ``/-/stat`` (``stat()``;
``?percentiles=50,99&windows=60`` choose what it aggregates), ``/-/metrics`` (the
Prometheus exposition, docs/metrics.md) and ``/-/dashboard`` (the live page, :mod:`.dashboard`).

Every response carries the request's ``X-Request-ID`` and, for a call that reached a
replica, a ``Server-Timing`` header; each request is one record of the access log
(:mod:`.accesslog`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

from werkzeug.wrappers import Response

from ..errors import ClientClosedRequest, MethodNotAllowedError, NotFoundError, RequestTimeoutError, ValidationError
from ..streams import ItemStream
from .accesslog import (
    REQUEST_ID_HEADER,
    AccessLog,
    RequestIds,
    assign_request_id,
    server_timing,
)
from .disconnect import ON_DISCONNECT, WATCH_AFTER_S
from .request import ServeRequest, buffer_body, call_method, parse_slo, shard_key
from .responses import PlainResponse, encode_result, error_response, json_response, text_response
from .routing import RouteMap
from .streaming import StreamResponse, wants_events

if TYPE_CHECKING:
    from ..queues import ServeFuture
    from ..serve import Serve

StartResponse = Callable[..., Any]
AnyResponse = Response | PlainResponse | StreamResponse
_BUILTIN_ALLOW = "GET, HEAD, OPTIONS"
_OURS = frozenset({"x-request-id", "server-timing"})  # response headers the front sets


class ServeApp:
    """The WSGI application serving one :class:`~serve_core.Serve` instance's routes.

    Args:
        serve: the instance whose endpoints are served.
        max_body_bytes: largest accepted request body (413 past it, before any of it is read).
            The standalone server reads it too (``BodyLimited`` in :mod:`.server`) and
            refuses a larger declared body itself, before calling the app.
        request_timeout_s: how long a request waits for its answer (504 past it; a query
            still queued then is withdrawn); ``None`` waits as long as it takes.
        debug: put tracebacks of failed calls in 500 bodies (never do this in production).
    """

    def __init__(
        self, serve: Serve, *, max_body_bytes: int, request_timeout_s: float | None = None, debug: bool = False
    ) -> None:
        self.serve = serve
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s
        self.debug = debug
        self._map = RouteMap(-1, {})
        self._builtins: dict[str, Callable[[ServeRequest], AnyResponse]] = {
            "/-/routes": lambda request: json_response(self.serve.route_table()),
            "/-/healthz": self._healthz,
            "/-/readyz": self._readyz,
            "/-/stat": self._stat,
            "/-/metrics": self._metrics,
        }
        self._builtins.update(serve.dashboard_app().routes)  # /-/dashboard and its files (docs/dashboard.md)
        config = serve.metrics.config
        self._ids = RequestIds() if config.request_ids else None
        self._server_timing = config.server_timing
        self._access = AccessLog()

    @property
    def url_map(self) -> RouteMap:
        """The current route map; rebuilt when the instance's routes have changed."""
        version = self.serve.routes_version
        if version != self._map.version:
            # Read the version first: a change racing with the copy triggers another rebuild.
            self._map = RouteMap.from_table(version, self.serve.route_table())
        return self._map

    def dispatch_request(self, request: ServeRequest) -> AnyResponse:
        """Route the request, call the backend and encode its result.

        Raises:
            ServeError: any failure; :meth:`wsgi_app` turns it into a response.
        """
        path = request.path
        if path.startswith("/-/"):
            return self._builtin(request, path)
        try:
            entry = self.url_map.match(path, request.method)
        except NotFoundError:  # the hint names /-/routes where this app is mounted
            raise NotFoundError(
                f"no endpoint at path {path!r}; GET {request.script_root}/-/routes lists the routes"
            ) from None
        if request.method == "OPTIONS" and "OPTIONS" not in entry.methods:
            return PlainResponse(b"", "text/plain", 200, (("Allow", entry.allow_header),))
        slo = parse_slo(request)
        method = call_method(request)
        buffer_body(request, self.max_body_bytes)
        future = self.serve.enqueue(
            entry.endpoint, request=request, method_name=method, slo=slo, shard_key=shard_key(request),
            caller_runs=True, caller_timeout_s=self.request_timeout_s,  # this thread waits: it may run the call
        )
        request.serve_endpoint = entry.endpoint
        try:
            result = self._wait(future, request.environ)
        except FutureTimeout:
            if future.done():
                raise  # the backend's own TimeoutError: its answer
            future.cancel()  # withdrawn if queued; a running async call is cancelled, a sync one finishes unheard
            self.serve.metrics.front_error(entry.endpoint, "timeout")
            raise RequestTimeoutError(
                f"no answer from endpoint {entry.endpoint!r} within {self.request_timeout_s} s"
            ) from None
        finally:
            request.serve_timing = future.timing
        if isinstance(result, ItemStream):  # a generator backend: its items as they come (docs/streaming.md)
            return StreamResponse(
                result, events=wants_events(request.headers.get("Accept")),
                where=f"{request.method} {request.path}", item_timeout_s=self.request_timeout_s,
            )  # fmt: skip
        return encode_result(result)

    def _wait(self, future: ServeFuture, environ: dict[str, Any]) -> Any:
        """The call's result within ``request_timeout_s``; a client that goes away meanwhile cancels it.

        The server's disconnect watch (:mod:`.disconnect`) is asked for once the call has taken
        :data:`~.disconnect.WATCH_AFTER_S`; a call it cancels answers 499 (nobody reads it).

        Raises:
            concurrent.futures.TimeoutError: no answer in time.
            ClientClosedRequest: the client went away and the call was cancelled.
        """
        watch = environ.get(ON_DISCONNECT)
        timeout = self.request_timeout_s
        if watch is None or (timeout is not None and timeout <= WATCH_AFTER_S):
            return future.result(timeout)
        try:
            return future.result(WATCH_AFTER_S)
        except FutureTimeout:
            if future.done():
                raise  # the backend's own TimeoutError
        gone: list[bool] = []

        def left() -> None:  # on the watcher's thread
            gone.append(True)
            future.cancel()

        unwatch = watch(left)
        try:
            return future.result(None if timeout is None else timeout - WATCH_AFTER_S)
        except CancelledError:
            if gone:
                raise ClientClosedRequest("the client closed the connection; its call was cancelled") from None
            raise
        finally:
            if unwatch is not None:
                unwatch()

    def wsgi_app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """The WSGI entry point (wrap this one with middleware)."""
        started = time.perf_counter()
        request = ServeRequest(environ)
        request_id = None
        try:
            if self._ids is not None:
                request_id = assign_request_id(self._ids, environ)
            response = self.dispatch_request(request)
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a response, even a
            # backend's SystemExit or CancelledError (they are answers, not this thread's signals)
            where = f"{request.method} {request.path}"
            response = error_response(exc, debug=self.debug, where=where)
            if self._ids is not None and request_id is None:  # the id itself was refused
                request_id = self._ids.new()
        timing = request.serve_timing
        extra: list[tuple[str, str]] = []
        if request_id is not None:
            extra.append((REQUEST_ID_HEADER, request_id))
        if timing is not None and self._server_timing:
            extra.append(("Server-Timing", server_timing(timing)))
        if not extra:
            body = response(environ, start_response)
        elif type(response) is PlainResponse or type(response) is StreamResponse:  # built for this request
            response.headers.extend(extra)
            body = response(environ, start_response)
        else:  # the backend's own Response, maybe shared: headers added on the way out
            body = response(environ, _adding(start_response, extra))
        if self._access.enabled:
            self._access.write(environ, response.status_code, started, request.serve_endpoint, timing, request_id)
        return body

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        return self.wsgi_app(environ, start_response)

    def _builtin(self, request: ServeRequest, path: str) -> AnyResponse:
        handler = self._builtins.get(path)
        if handler is None:
            raise NotFoundError(f"no built-in route {path!r}; GET {request.script_root}/-/routes lists the routes")
        if request.method == "OPTIONS":
            return PlainResponse(b"", "text/plain", 200, (("Allow", _BUILTIN_ALLOW),))
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowedError(
                f"method {request.method} is not allowed at {path!r}; allowed: {_BUILTIN_ALLOW}",
                ("GET", "HEAD", "OPTIONS"),
            )
        return handler(request)

    def _stat(self, request: ServeRequest) -> PlainResponse:
        """``stat()``; ``?percentiles=50,99&windows=60`` choose other ones (comma-separated numbers)."""
        options: dict[str, list[float]] = {}
        for name, argument in (("percentiles", "percentiles"), ("windows", "agg_windows_seconds")):
            text = request.args.get(name)
            if text is not None:
                try:
                    options[argument] = [float(part) for part in text.split(",") if part.strip()]
                except ValueError:
                    raise ValidationError(f"{name} must be comma-separated numbers, got {text!r}") from None
        return json_response(self.serve.stat(**options))

    def _metrics(self, request: ServeRequest) -> PlainResponse:
        """The Prometheus exposition (OpenMetrics when the scraper's ``Accept`` asks for it)."""
        body, content_type = self.serve.metrics.exporter().exposition(request.headers.get("Accept"))
        return PlainResponse(body, content_type)

    def _healthz(self, request: ServeRequest) -> PlainResponse:
        if self.serve.running:
            return text_response("ok\n")
        return text_response(f"{self.serve.state}\n", 503)  # draining: load balancers should stop sending

    def _readyz(self, request: ServeRequest) -> PlainResponse:
        """200 when every endpoint with traffic has a ready replica here (``Serve.readiness()``), else 503."""
        readiness = self.serve.readiness()
        return json_response(readiness, 200 if readiness["ready"] else 503)

    def __repr__(self) -> str:
        return f"<ServeApp {self.serve!r} routes={len(self.url_map)}>"


def _adding(start_response: StartResponse, extra: list[tuple[str, str]]) -> StartResponse:
    """``start_response`` that sends ``extra`` in place of the response's own headers of those names."""

    def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        headers = [(name, value) for name, value in headers if name.lower() not in _OURS] + extra
        if exc_info is None:
            return start_response(status, headers)
        return start_response(status, headers, exc_info)

    return start

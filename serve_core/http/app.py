"""``ServeApp``: the WSGI application of a serve instance.

It has Werkzeug's shape — a ``url_map`` (rebuilt when the registry's routes change), a
``dispatch_request`` turning a request into a response, a ``wsgi_app`` doing the WSGI
plumbing and a ``__call__`` that only delegates, so middleware can wrap ``wsgi_app`` —
and can be mounted anywhere, e.g. under a prefix with Werkzeug's ``DispatcherMiddleware``::

    app = DispatcherMiddleware(flask_app, {"/serve": serve.wsgi_app()})

Built-in routes under the reserved ``/-/`` prefix: ``/-/routes`` (``{route: [endpoint,
[methods]]}``), ``/-/healthz`` (200 while the instance runs) and ``/-/stat`` (``stat()``;
``?percentiles=50,99&windows=60`` choose what it aggregates).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

from werkzeug.wrappers import Response

from ..errors import MethodNotAllowedError, NotFoundError, RequestTimeoutError, ValidationError
from .request import ServeRequest, buffer_body, call_method, parse_slo, shard_key
from .responses import PlainResponse, encode_result, error_response, json_response, text_response
from .routing import RouteMap

if TYPE_CHECKING:
    from ..serve import Serve

StartResponse = Callable[..., Any]
AnyResponse = Response | PlainResponse
_BUILTIN_ALLOW = "GET, HEAD, OPTIONS"


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
            "/-/stat": self._stat,
        }

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
            entry.endpoint, request=request, method_name=method, slo=slo, shard_key=shard_key(request)
        )
        try:
            result = future.result(self.request_timeout_s)
        except FutureTimeout:
            if future.done():
                raise  # the backend's own TimeoutError: its answer
            future.cancel()  # withdrawn if still queued; a running call finishes unheard
            raise RequestTimeoutError(
                f"no answer from endpoint {entry.endpoint!r} within {self.request_timeout_s} s"
            ) from None
        return encode_result(result)

    def wsgi_app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """The WSGI entry point (wrap this one with middleware)."""
        request = ServeRequest(environ)
        try:
            response = self.dispatch_request(request)
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a response, even a
            # backend's SystemExit or CancelledError (they are answers, not this thread's signals)
            where = f"{request.method} {request.path}"
            response = error_response(exc, debug=self.debug, where=where)
        return response(environ, start_response)

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

    def _healthz(self, request: ServeRequest) -> PlainResponse:
        if self.serve.running:
            return text_response("ok\n")
        return text_response(f"{self.serve.state}\n", 503)  # draining: load balancers should stop sending

    def __repr__(self) -> str:
        return f"<ServeApp {self.serve!r} routes={len(self.url_map)}>"

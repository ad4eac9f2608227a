"""The module-level API (``serve.init``, ``serve.link``…) bound to a default instance.

The default instance is created by :func:`init` and cleared by :func:`shutdown`; it is
the only process-wide state, held by one ``_Default`` object.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import ServeStateError
from .serve import Serve, warn_if_different

F = TypeVar("F", bound=Callable[..., Any])


class _Default:
    """Holds the default ``Serve`` instance."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.instance: Serve | None = None

    def get(self) -> Serve:
        instance = self.instance
        if instance is None or not instance.running:
            raise ServeStateError("serve_core is not initialised; call serve_core.init() first")
        return instance


_default = _Default()


def init(**kwargs: Any) -> Serve:
    """Start the default instance (see :class:`Serve` for the arguments).

    Idempotent: a second call returns the running instance and warns if its
    arguments differ.
    """
    with _default.lock:
        running = _default.instance
        if running is not None and running.running:
            warn_if_different(running, kwargs)
            return running
        _default.instance = Serve(**kwargs)
        return _default.instance


def shutdown() -> None:
    """Stop the default instance, if any. Idempotent."""
    with _default.lock:
        instance, _default.instance = _default.instance, None
    if instance is not None:
        instance.shutdown()


def _forward(method: F) -> F:
    name = method.__name__

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(_default.get(), name)(*args, **kwargs)

    return call  # type: ignore[return-value]


create_endpoint = _forward(Serve.create_endpoint)
create_backend = _forward(Serve.create_backend)
link = _forward(Serve.link)
split = _forward(Serve.split)
get_handle = _forward(Serve.get_handle)
get_backend_config = _forward(Serve.get_backend_config)
set_backend_config = _forward(Serve.set_backend_config)
get_traffic_policy = _forward(Serve.get_traffic_policy)
stat = _forward(Serve.stat)
wsgi_app = _forward(Serve.wsgi_app)
http_address = _forward(Serve.http_address)


class route:
    """Decorator: ``@serve.route("/path")`` creates backend ``<name>:v0`` and endpoint
    ``<name>`` at the route, links them and returns the endpoint's handle."""

    def __init__(self, url_route: str) -> None:
        self.url_route = url_route

    def __call__(self, func_or_class: Any) -> Any:
        return _default.get().route(self.url_route)(func_or_class)


def accept_batch(func: F) -> F:
    """Mark a function or ``__call__`` as taking batches (lists of arguments)."""
    func._serve_accept_batch = True  # type: ignore[attr-defined]
    return func

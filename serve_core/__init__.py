"""serve_core: the Ray Serve 0.8 API as an embeddable library with pluggable executors.

Usage::

    import serve_core as serve

    serve.init()
    serve.create_endpoint("echo", "/echo")
    serve.create_backend(lambda request: "hi", "echo:v1")
    serve.link("echo", "echo:v1")
    serve.get_handle("echo").remote().result()
"""

from __future__ import annotations

from .api import (
    accept_batch,
    create_backend,
    create_endpoint,
    get_backend_config,
    get_handle,
    get_traffic_policy,
    http_address,
    init,
    link,
    route,
    set_backend_config,
    shutdown,
    split,
    stat,
    wsgi_app,
)
from .config import AutoscalingConfig, BackendConfig
from .context import context
from .errors import (
    BackPressureError,
    BatchAnnotationError,
    BatchResultError,
    ConflictError,
    DeadlineExceededError,
    LoopBackError,
    MethodNotFoundError,
    NotFoundError,
    RayServeException,
    ReplicaDiedError,
    ServeError,
    ServeStateError,
    ServeTypeError,
    ShuttingDownError,
    StoreError,
    ValidationError,
    WebOnlyAccessError,
)
from .handle import ServeHandle
from .policy import Policy, RoutePolicy
from .serve import Serve

__version__ = "0.1.0"

__all__ = [
    "AutoscalingConfig",
    "BackPressureError",
    "BackendConfig",
    "BatchAnnotationError",
    "BatchResultError",
    "ConflictError",
    "DeadlineExceededError",
    "LoopBackError",
    "MethodNotFoundError",
    "NotFoundError",
    "Policy",
    "RayServeException",
    "ReplicaDiedError",
    "RoutePolicy",
    "Serve",
    "ServeError",
    "ServeHandle",
    "ServeStateError",
    "ServeTypeError",
    "ShuttingDownError",
    "StoreError",
    "ValidationError",
    "WebOnlyAccessError",
    "__version__",
    "accept_batch",
    "context",
    "create_backend",
    "create_endpoint",
    "get_backend_config",
    "get_handle",
    "get_traffic_policy",
    "http_address",
    "init",
    "link",
    "route",
    "set_backend_config",
    "shutdown",
    "split",
    "stat",
    "wsgi_app",
]

"""The registry: endpoints, backends and traffic, with their validation (no I/O).

A :class:`Registry` is a value read from the store (``serve_core.persistence``): changes are
validated against the store's current state, then committed, and every instance converges on
what was committed. Every ``check_*`` method validates a change and returns what to write
(or ``None`` when the change is an identical redefinition, a no-op); the ``add``/``set``
methods build a registry from stored records.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import re
from collections.abc import Iterable
from typing import Any

from .config import BackendConfig
from .errors import (
    BatchAnnotationError,
    ConflictError,
    NotFoundError,
    ServeTypeError,
    ValidationError,
)
from .fingerprint import code_id, shape_id
from .invoke import accepts_batch, is_public_method
from .split import validate_weights

log = logging.getLogger("serve_core")

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
RESERVED_ROUTE_PREFIX = "/-/"


@dataclasses.dataclass(frozen=True)
class EndpointInfo:
    name: str
    route: str | None
    methods: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """A backend's definition: its code and init arguments (its live config is its runtime's)."""

    tag: str
    target: Any
    init_args: tuple[Any, ...]
    accepts_batch: bool
    code_id: str  # serve_core.fingerprint.code_id of target and init_args
    shape_id: str = ""  # serve_core.fingerprint.shape_id: the same, blind to module state


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """A stored backend as validation sees it, without its code.

    ``code_id`` and ``accepts_batch`` are ``None`` in records written before they were
    stored: such a record is adopted by the next ``create_backend`` of its tag.
    """

    tag: str
    code_id: str | None
    accepts_batch: bool | None
    shape_id: str | None = None


def _name(kind: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ServeTypeError(f"{kind} must be a string, got {type(value).__name__}")
    if not value or value != value.strip():
        raise ValidationError(f"{kind} must be non-empty without surrounding spaces, got {value!r}")
    return value


def normalise_methods(methods: Iterable[str]) -> tuple[str, ...]:
    """Upper-case, de-duplicate and validate HTTP methods."""
    if isinstance(methods, str):
        methods = [methods]
    result: list[str] = []
    for method in methods:
        if not isinstance(method, str):
            raise ServeTypeError(f"HTTP methods must be strings, got {method!r}")
        upper = method.upper()
        if upper not in HTTP_METHODS:
            raise ValidationError(f"unknown HTTP method {method!r}; use one of {sorted(HTTP_METHODS)}")
        if upper not in result:
            result.append(upper)
    if not result:
        raise ValidationError("an endpoint needs at least one HTTP method")
    return tuple(result)


def _validate_route(route: Any) -> str | None:
    if route is None:
        return None
    if not isinstance(route, str):
        raise ServeTypeError(f"route must be a string or None, got {type(route).__name__}")
    if not route.startswith("/") or any(c.isspace() for c in route):
        raise ValidationError(f"route must start with '/' and contain no spaces, got {route!r}")
    if route.startswith(RESERVED_ROUTE_PREFIX) or route == "/-":
        raise ValidationError(f"routes under {RESERVED_ROUTE_PREFIX!r} are reserved, got {route!r}")
    return route


def _next_tag(tag: str) -> str:
    """The tag to suggest for a new version: ``echo:v2`` → ``echo:v3``, ``echo`` → ``echo:v2``."""
    match = re.fullmatch(r"(.*:v)(\d+)", tag)
    return f"{match.group(1)}{int(match.group(2)) + 1}" if match else f"{tag}:v2"


def _callable_names(cls: type) -> list[str]:
    """What callers can reach on instances of ``cls``: ``__call__`` if it defines one, and public methods."""
    names = [name for name in dir(cls) if is_public_method(name) and name != "__call__"]
    names = [name for name in names if inspect.isroutine(inspect.getattr_static(cls, name, None))]
    if any("__call__" in vars(klass) for klass in cls.__mro__[:-1]):
        names.append("__call__")
    return names


class Registry:
    """Endpoints, backends, their configs and traffic, as one store revision holds them.

    Args:
        where: the store's description, named in conflict errors.
    """

    def __init__(self, where: str = "memory") -> None:
        self.where = where
        self.endpoints: dict[str, EndpointInfo] = {}
        self.routes: dict[str, str] = {}
        self.backends: dict[str, BackendSpec] = {}
        self.configs: dict[str, BackendConfig] = {}
        self.traffic: dict[str, dict[str, float]] = {}

    # endpoints -----------------------------------------------------------
    def check_endpoint(self, name: Any, route: Any, methods: Iterable[str]) -> EndpointInfo | None:
        info = EndpointInfo(_name("endpoint name", name), _validate_route(route), normalise_methods(methods))
        existing = self.endpoints.get(info.name)
        if existing == info:
            return None
        if existing is not None:
            raise ConflictError(
                f"endpoint {info.name!r} already exists with route {existing.route!r} and methods "
                f"{list(existing.methods)}; choose another name"
            )
        if info.route is not None and info.route in self.routes:
            raise ConflictError(
                f"route {info.route!r} already serves endpoint {self.routes[info.route]!r}"
            )
        return info

    def add_endpoint(self, info: EndpointInfo) -> None:
        old = self.endpoints.get(info.name)
        if old is not None and old.route is not None and self.routes.get(old.route) == info.name:
            del self.routes[old.route]
        self.endpoints[info.name] = info
        if info.route is not None:
            self.routes[info.route] = info.name

    def endpoint(self, name: str) -> EndpointInfo:
        info = self.endpoints.get(name)
        if info is None:
            raise NotFoundError(f"endpoint {name!r} is not registered; create it with create_endpoint")
        return info

    # backends ------------------------------------------------------------
    def check_backend(
        self, target: Any, tag: Any, init_args: tuple[Any, ...], config: Any, replace: bool = False
    ) -> tuple[BackendInfo, BackendConfig]:
        """Validate a backend definition and its config.

        Returns:
            The definition, and a detached copy of the config.

        Raises:
            ServeTypeError, BatchAnnotationError: a bad target, init args or config.
            ConflictError: the tag is taken by a different definition (unless ``replace``).
        """
        _name("backend tag", tag)
        if not (inspect.isfunction(target) or inspect.isclass(target)):
            raise ServeTypeError(f"a backend must be a function or a class, got {type(target).__name__}")
        if inspect.isclass(target) and not _callable_names(target):
            raise ServeTypeError(
                f"backend class {target.__qualname__} has neither __call__ nor a public method to call"
            )
        if inspect.isfunction(target) and init_args:
            raise ServeTypeError("init arguments are only accepted for class backends")
        args = tuple(init_args)
        info = BackendInfo(tag, target, args, accepts_batch(target), code_id(target, args), shape_id(target, args))
        config = self.check_config(info, BackendConfig() if config is None else config)
        existing = self.backends.get(tag)
        if not replace and existing is not None and existing.code_id not in (None, info.code_id):
            raise ConflictError(
                f"backend {tag!r} already exists in store {self.where} with different code or init "
                f"arguments; create the new definition under a new tag (e.g. {self._free_tag(tag)!r}) and move "
                "traffic with split(), or replace it everywhere with create_backend(..., replace=True); to "
                "change only its config use set_backend_config()"
            )
        return info, config

    def _free_tag(self, tag: str) -> str:
        """The next version of ``tag`` that no backend has."""
        candidate = _next_tag(tag)
        while candidate in self.backends:
            candidate = _next_tag(candidate)
        return candidate

    @staticmethod
    def check_config(info: BackendInfo | BackendSpec, config: Any) -> BackendConfig:
        """Validate a config for a backend; returns a detached copy."""
        if not isinstance(config, BackendConfig):
            raise ServeTypeError(f"backend_config must be a BackendConfig, got {type(config).__name__}")
        if config.batch_wait_timeout_s and config.max_batch_size is None:
            raise ValidationError(
                f"backend {info.tag!r} sets batch_wait_timeout_s but no max_batch_size; a wait only "
                "applies to batches"
            )
        if config.max_batch_size is not None and info.accepts_batch is False:
            raise BatchAnnotationError(
                f"backend {info.tag!r} sets max_batch_size but its function or __call__ does "
                "not accept batching; mark it with @serve.accept_batch"
            )
        return config.copy()

    def backend(self, tag: str) -> BackendSpec:
        spec = self.backends.get(tag)
        if spec is None:
            raise NotFoundError(f"backend {tag!r} is not registered; create it with create_backend")
        return spec

    def add_backend(self, spec: BackendSpec, config: BackendConfig) -> None:
        self.backends[spec.tag] = spec
        self.configs[spec.tag] = config

    # traffic -------------------------------------------------------------
    def check_split(self, endpoint: str, weights: Any) -> dict[str, float]:
        self.endpoint(endpoint)
        return validate_weights(endpoint, weights, self.backends)

    def set_traffic(self, endpoint: str, weights: dict[str, float]) -> None:
        self.traffic[endpoint] = dict(weights)

    def route_table(self) -> dict[str, list[Any]]:
        """``{route: [endpoint, [methods]]}`` for endpoints with a route."""
        return {route: self.route_entry(name) for route, name in list(self.routes.items())}

    def route_entry(self, name: str) -> list[Any]:
        """``[endpoint, [methods]]``, the endpoint's value in :meth:`route_table`."""
        return [name, list(self.endpoints[name].methods)]

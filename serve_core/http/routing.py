"""The route map: exact-path routes of an instance's endpoints, rebuilt when they change.

Matching is exact on the request path (no prefixes, no trailing-slash rewriting, no
path parameters), as in the original. Besides an endpoint's own methods, ``HEAD`` is
served wherever ``GET`` is, and ``OPTIONS`` is always answered (by the backend when the
endpoint lists it, otherwise by the front with an ``Allow`` header).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..errors import MethodNotAllowedError, NotFoundError


@dataclasses.dataclass(frozen=True, slots=True)
class RouteEntry:
    """One route: its endpoint, registered methods and every method it answers."""

    route: str
    endpoint: str
    methods: tuple[str, ...]
    allowed: frozenset[str]
    allow_header: str

    @classmethod
    def build(cls, route: str, endpoint: str, methods: tuple[str, ...]) -> RouteEntry:
        allowed = set(methods) | {"OPTIONS"}
        if "GET" in allowed:
            allowed.add("HEAD")
        return cls(route, endpoint, methods, frozenset(allowed), ", ".join(sorted(allowed)))


class RouteMap:
    """An immutable ``{path: RouteEntry}`` snapshot tagged with the registry's version."""

    __slots__ = ("version", "_entries")

    def __init__(self, version: int, entries: Mapping[str, RouteEntry]) -> None:
        self.version = version
        self._entries = dict(entries)

    @classmethod
    def from_table(cls, version: int, table: Mapping[str, list[Any]]) -> RouteMap:
        """Build from ``Serve.route_table()``: ``{route: [endpoint, [methods]]}``."""
        entries = {
            route: RouteEntry.build(route, name, tuple(methods)) for route, (name, methods) in table.items()
        }
        return cls(version, entries)

    def match(self, path: str, method: str) -> RouteEntry:
        """The entry serving ``method`` at ``path``.

        Raises:
            NotFoundError: no route at ``path``.
            MethodNotAllowedError: the route does not answer ``method``.
        """
        entry = self._entries.get(path)
        if entry is None:
            raise NotFoundError(f"no endpoint at path {path!r}; GET /-/routes lists the routes")
        if method not in entry.allowed:
            raise MethodNotAllowedError(
                f"method {method} is not allowed at {path!r}; allowed: {entry.allow_header}",
                tuple(sorted(entry.allowed)),
            )
        return entry

    def __len__(self) -> int:
        return len(self._entries)

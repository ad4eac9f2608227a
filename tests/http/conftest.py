"""Fixtures of the HTTP tests: an instance with (or without) its server, and a client
parametrized over the in-process test client and a real socket."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from serve_core import Serve

from .helpers import InProcess, OverSocket


@pytest.fixture(params=["test-client", "socket"])
def via(request: pytest.FixtureRequest) -> str:
    """How the test reaches the app."""
    return str(request.param)


@pytest.fixture
def make_app(make_serve: Callable[..., Serve], via: str) -> Callable[..., tuple[Serve, Any]]:
    """Build an instance (HTTP on a free port when reached by socket) and a client for it."""

    def build(**kwargs: Any) -> tuple[Serve, Any]:
        if via == "socket":
            kwargs.update(start_server=True, http_port=0, blocking=True)
        srv = make_serve(**kwargs)
        return srv, (OverSocket(srv) if via == "socket" else InProcess(srv))

    return build

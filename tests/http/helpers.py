"""One interface over the two ways the HTTP tests reach the app: Werkzeug's test client
(in-process) and ``requests`` through a real socket on 127.0.0.1."""

from __future__ import annotations

import dataclasses
from typing import Any

import requests
from werkzeug.test import Client

from serve_core import Serve

from ..conftest import WAIT


@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def base_url(srv: Serve) -> str:
    """``http://host:port`` of the instance's standalone server."""
    address = srv.http_address()
    assert address is not None, "the instance has no HTTP server"
    return f"http://{address[0]}:{address[1]}"


class InProcess:
    """Werkzeug's test client over ``srv.wsgi_app()``."""

    kind = "test-client"

    def __init__(self, srv: Serve) -> None:
        self._client = Client(srv.wsgi_app())

    def request(self, method: str, path: str, **kwargs: Any) -> Reply:
        response = self._client.open(path, method=method, **kwargs)
        headers = {k.lower(): v for k, v in response.headers.items()}
        return Reply(response.status_code, headers, response.get_data())


class OverSocket:
    """``requests`` against the instance's standalone server."""

    kind = "socket"

    def __init__(self, srv: Serve) -> None:
        self.base = base_url(srv)

    def request(self, method: str, path: str, **kwargs: Any) -> Reply:
        if "query_string" in kwargs:
            kwargs["params"] = kwargs.pop("query_string")
        response = requests.request(method, self.base + path, timeout=WAIT, **kwargs)
        headers = {k.lower(): v for k, v in response.headers.items()}
        return Reply(response.status_code, headers, response.content)

"""Importable backends for the KV tests (stored by import path, ``module:qualname``)."""

from __future__ import annotations

from typing import Any

import serve_core as serve


class Greeter:
    """A batching class backend with a constructor argument."""

    def __init__(self, greeting: str) -> None:
        self.greeting = greeting

    @serve.accept_batch
    def __call__(self, flask_request: Any, name: list[str]) -> list[str]:
        return [f"{self.greeting} {n}" for n in name]


def echo(flask_request: Any, name: str = "x") -> str:
    """A plain function backend."""
    return f"echo {name}"


def make_shout(suffix: str) -> Any:
    """A closure: not importable, so it is stored as a signed pickle."""

    def shout(flask_request: Any, name: str = "x") -> str:
        return f"{name}{suffix}"

    return shout


class Tagged:
    """A class whose init arguments are not JSON-safe (a set): stored as a signed pickle."""

    def __init__(self, tags: set[str]) -> None:
        self.tags = tags

    def __call__(self, flask_request: Any) -> list[str]:
        return sorted(self.tags)

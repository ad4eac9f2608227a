"""Backends and events of the streaming tests, usable on every executor.

Module-level so that worker processes and Ray actors import them by name; the events a
backend waits on or sets are the kind its executor can share (see :func:`make_event`).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import serve_core as serve

from .conftest import WAIT


def make_event(executor: str, managers: list[Any]) -> Any:
    """A ``threading.Event`` look-alike shared with replicas of ``executor``."""
    if executor in ("inline", "thread"):
        return threading.Event()
    if executor == "ray":
        from .ray_fixtures import RayEvent

        return RayEvent()
    if not managers:
        import multiprocessing

        managers.append(multiprocessing.get_context("spawn").Manager())
    return managers[0].Event()


def counting(n: int = 3, finished: Any = None) -> Iterator[int]:
    """Yields 0..n-1; sets ``finished`` in its ``finally``."""
    try:
        yield from range(n)
    finally:
        if finished is not None:
            finished.set()


async def acounting(n: int = 3, finished: Any = None) -> AsyncIterator[int]:
    """:func:`counting` as an async generator."""
    try:
        for i in range(n):
            yield i
    finally:
        if finished is not None:
            finished.set()


def endless(finished: Any = None) -> Iterator[str]:
    """Yields forever (only back-pressure and a close stop it); sets ``finished`` in its ``finally``."""
    try:
        while True:
            yield "tick\n"
    finally:
        if finished is not None:
            finished.set()


def held(release: Any) -> Iterator[Any]:
    """One item, then waits for ``release`` before the last ones: proves the first left early."""
    yield "first\n"
    if not release.wait(WAIT):
        raise TimeoutError("release was never set")
    yield {"n": 1}
    yield b"raw\n"


def failing(after: int = 1) -> Iterator[str]:
    """``after`` items, then an error."""
    for i in range(after):
        yield f"item {i}\n"
    raise ValueError("the model fell over")


def with_context(request: Any = None) -> Iterator[Any]:
    """The call's ``serve.context`` as seen from inside the generator's body, at two steps."""
    yield serve.context.web
    yield serve.context.request_id


def plain(x: int = 1) -> int:
    return x * 2


def web_stream(request: Any) -> Iterator[Any]:
    """What an HTTP endpoint streams: items of each encoding, driven by the query string."""
    kind = request.args.get("kind", "text")
    for i in range(3):
        yield f"line {i}\n" if kind == "text" else {"i": i}


def dying() -> Iterator[int]:
    """One item, then its worker process exits (the process executor's crash mid-stream)."""
    import os

    yield 0
    os._exit(3)


class Waiting:
    """An async backend that awaits forever, telling ``started`` and, once cancelled, ``cancelled``."""

    def __init__(self, started: Any, cancelled: Any) -> None:
        self.started = started
        self.cancelled = cancelled

    async def __call__(self, request: Any) -> str:
        import asyncio

        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return "never"


class Gated:
    """A sync backend that holds its replica until ``gate`` opens, listing its calls in ``calls``."""

    def __init__(self, started: Any, gate: Any, calls: list[str]) -> None:
        self.started = started
        self.gate = gate
        self.calls = calls

    def __call__(self, request: Any) -> str:
        self.calls.append(request.args.get("n", ""))
        self.started.set()
        if not self.gate.wait(WAIT):
            raise TimeoutError("the gate never opened")
        return request.args.get("n", "")


def held_call(*, release: Any) -> Iterator[Any]:
    """:func:`held` for a handle call (keyword-only: no request argument)."""
    yield from held(release)


def late(*, gate: Any) -> Iterator[int]:
    """Its first item waits for ``gate``."""
    if not gate.wait(WAIT):
        raise TimeoutError("the gate never opened")
    yield 1

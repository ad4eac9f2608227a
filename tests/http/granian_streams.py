"""Backends of ``test_rsgi_streaming``, imported by the Granian server's app by reference.

The events live here, in the server's process, so that one endpoint (``/flags``) can release a
producer and report what happened inside the others.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

EVENTS = {name: threading.Event() for name in ("release", "finished", "started", "cancelled")}


def held(request: Any) -> Iterator[Any]:
    yield "first\n"
    EVENTS["release"].wait(30)
    yield {"n": 1}


def endless(request: Any) -> Iterator[str]:
    try:
        while True:
            yield "tick\n"
    finally:
        EVENTS["finished"].set()


def failing(request: Any) -> Iterator[str]:
    yield "a"
    raise ValueError("the model fell over")


async def waiting(request: Any) -> str:
    EVENTS["started"].set()
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        EVENTS["cancelled"].set()
        raise
    return "never"


def flags(request: Any) -> dict[str, bool]:
    if request.args.get("release"):
        EVENTS["release"].set()
    return {name: event.is_set() for name, event in EVENTS.items()}

"""A local Ray for the tests: started once on first use, shut down at the end of the session.

Starting Ray takes seconds, so tests share one local instance (``num_cpus=2``, no
dashboard) instead of starting their own. A test that needs a different Ray (the
multi-node cluster) shuts this one down; the next test that asks starts it again.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import pytest

LOCAL_RAY: dict[str, Any] = {
    "num_cpus": 2,
    "include_dashboard": False,
    "log_to_driver": False,
    "configure_logging": False,
}


def ray_missing_reason() -> str:
    return "ray is not installed (pip install 'serve-core[ray]')"


@pytest.fixture(scope="session")
def _ray_session() -> Iterator[None]:
    yield
    if importlib.util.find_spec("ray") is not None:
        import ray

        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture
def ray_local(_ray_session: None) -> Any:
    """The ``ray`` module, initialised as a local 2-CPU node (skips, or fails in CI, without Ray)."""
    from .conftest import require

    require(importlib.util.find_spec("ray") is not None, ray_missing_reason())
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(**LOCAL_RAY)
    return ray


class RayEvent:
    """A ``threading.Event`` look-alike that works inside Ray actors (a tiny async actor holds it).

    It pickles (with its actor handle) into backends on the ray executor, so tests can
    hold a replica in the middle of a call and release it, without sleeping.
    """

    def __init__(self) -> None:
        import ray

        self._actor: Any = ray.remote(num_cpus=0)(_EventActor).remote()

    def set(self) -> None:
        import ray

        ray.get(self._actor.set.remote())

    def is_set(self) -> bool:
        import ray

        return bool(ray.get(self._actor.is_set.remote()))

    def wait(self, timeout: float | None = None) -> bool:
        import ray

        try:
            return bool(ray.get(self._actor.wait.remote(), timeout=timeout))
        except ray.exceptions.GetTimeoutError:
            return False


class _EventActor:
    def __init__(self) -> None:
        import asyncio

        self._event = asyncio.Event()

    async def wait(self) -> bool:
        await self._event.wait()
        return True

    async def set(self) -> None:
        self._event.set()

    async def is_set(self) -> bool:
        return self._event.is_set()

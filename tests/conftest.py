"""Shared fixtures: fresh ``Serve`` instances, the executor matrix, leak checks."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import serve_core as serve
from serve_core import Serve

from .procs import descendants, describe_processes, wait_until
from .ray_fixtures import RayEvent, _ray_session, foreign_ray, ray_local  # noqa: F401 - Ray fixtures

# Executors every behaviour test runs against. Executors that need an optional
# component are here too: their tests skip without it locally, and fail in CI.
CONFORMANCE_EXECUTORS = ["inline", "thread", "process", "ray"]

# Executors that run calls concurrently with the caller (not inline).
CONCURRENT_EXECUTORS = [name for name in CONFORMANCE_EXECUTORS if name != "inline"]

WAIT = 10.0  # seconds: the timeout of every wait in the tests


def require(condition: bool, reason: str) -> None:
    """Skip when a component is missing, but fail when CI says everything must be there."""
    if condition:
        return
    if os.environ.get("SERVE_CORE_REQUIRE_ALL"):
        pytest.fail(f"required component missing in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(params=CONFORMANCE_EXECUTORS)
def executor(request: pytest.FixtureRequest) -> str:
    """The name of an executor from the conformance matrix."""
    _prepare_executor(request)
    return str(request.param)


@pytest.fixture(params=CONCURRENT_EXECUTORS)
def concurrent_executor(request: pytest.FixtureRequest) -> str:
    """An executor whose replicas run concurrently with the caller."""
    _prepare_executor(request)
    return str(request.param)


def _prepare_executor(request: pytest.FixtureRequest) -> None:
    """Start what an executor needs (a shared local Ray), or skip/fail without it."""
    if request.param == "ray":
        request.getfixturevalue("ray_local")


@pytest.fixture
def make_serve() -> Iterator[Callable[..., Serve]]:
    """Build ``Serve`` instances (no HTTP server unless asked); all are shut down after the test."""
    instances: list[Serve] = []

    def build(**kwargs: Any) -> Serve:
        kwargs.setdefault("start_server", False)
        instance = Serve(**kwargs)
        instances.append(instance)
        return instance

    yield build
    for instance in instances:
        instance.shutdown()


@pytest.fixture
def srv(make_serve: Callable[..., Serve], executor: str) -> Serve:
    """A fresh instance on each conformance executor."""
    return make_serve(executor=executor)


@pytest.fixture
def csrv(make_serve: Callable[..., Serve], concurrent_executor: str) -> Serve:
    """A fresh instance on each concurrent executor."""
    return make_serve(executor=concurrent_executor)


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Every thread a test starts must be gone once its instances are shut down."""
    before = set(threading.enumerate())
    yield
    serve.shutdown()
    deadline = threading.Event()
    leaked: list[threading.Thread] = []
    for _ in range(int(WAIT / 0.05)):
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        leaked = [t for t in leaked if not t.name.startswith(_FOREIGN_THREADS)]
        if not leaked:
            break
        deadline.wait(0.05)  # polling a condition with a bounded timeout, not synchronisation
    assert not leaked, f"threads leaked: {leaked}"


# Threads owned by third-party libraries that outlive a test by design (Ray's client, etc.).
_FOREIGN_THREADS: tuple[str, ...] = (
    "PythonGCThread",  # Ray's garbage-collection helper, lives as long as the shared local Ray
    "ray_listen_error_messages",  # Ray's driver-side error listener, same lifetime
    "ray_print_logs",  # Ray's worker-log forwarder (when log_to_driver is on)
)


@pytest.fixture
def make_gate(concurrent_executor: str) -> Iterator[Callable[[], Any]]:
    """Events a backend can wait on, usable on the executor under test.

    Threads share ``threading.Event``; replicas in worker processes get a
    multiprocessing manager's Event (its proxy pickles into spawned workers);
    Ray actors get a :class:`RayEvent`.
    """
    managers: list[Any] = []

    def build() -> Any:
        if concurrent_executor == "thread":
            return threading.Event()
        if concurrent_executor == "ray":
            return RayEvent()
        if not managers:
            import multiprocessing

            managers.append(multiprocessing.get_context("spawn").Manager())
        return managers[0].Event()

    yield build
    for manager in managers:
        manager.shutdown()


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Every process a test starts (replica workers) must be gone once its instances are shut down."""
    before = descendants()
    yield
    serve.shutdown()
    wait_until(lambda: not descendants() - before, WAIT)
    leaked = descendants() - before
    assert not leaked, f"processes leaked: {describe_processes(leaked)}"

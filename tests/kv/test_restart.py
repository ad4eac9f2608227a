"""Restart tests: a registry built in a subprocess killed with SIGKILL comes back."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from serve_core import Serve
from serve_core.kv.sql import SQLKVStore

from ..conftest import WAIT

ROOT = Path(__file__).resolve().parents[2]
SECRET = "restart-test-secret-0123456789"


class Child:
    """A ``tests.kv.child`` subprocess, read line by line with a timeout."""

    def __init__(self, args: list[str], log: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self._stderr = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.kv.child", *args],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, bufsize=0,
        )
        self.log = log

    def expect(self, word: str, timeout: float = 3 * WAIT) -> str:
        """Read lines until one starts with ``word``; returns the rest of it."""
        assert self.proc.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise AssertionError(f"no {word!r} from the child in {timeout} s: {self.log.read_text()}")
                line = _readline(self.proc.stdout).decode()
                if not line:
                    raise AssertionError(f"child exited before {word!r}: {self.log.read_text()}")
                if line.startswith(word):
                    return line[len(word):].strip()
        finally:
            selector.close()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=WAIT) == -signal.SIGKILL
        self.close()

    def close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self._stderr.close()


def _readline(stream: IO[bytes]) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        byte = stream.read(1)
        if not byte:
            break
        line += byte
    return line


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Child]]:
    children: list[Child] = []

    def start(*args: str) -> Child:
        child = Child(list(args), tmp_path / f"child{len(children)}.log")
        children.append(child)
        return child

    yield start
    for child in children:
        if child.proc.poll() is None:
            child.kill()


@pytest.fixture
def store_url(sql_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """SQLite signs with its key file; PostgreSQL needs SERVE_CORE_SECRET (children inherit it)."""
    if sql_url.startswith("sqlite"):
        monkeypatch.delenv("SERVE_CORE_SECRET", raising=False)
    else:
        monkeypatch.setenv("SERVE_CORE_SECRET", SECRET)
    return sql_url


def _check_deployment(srv: Serve) -> None:
    assert srv.restored.endpoints == ["api"]
    assert srv.restored.backends == ["greet:v1", "shout:v1"]
    assert srv.restored.traffic == ["api"] and not srv.restored.failed
    assert srv.route_table() == {"/api": ["api", ["GET", "POST"]]}
    config = srv.get_backend_config("greet:v1")
    assert (config.num_replicas, config.max_batch_size) == (2, 4)
    assert len(srv.replica_ids("greet:v1")) == 2
    assert srv.get_traffic_policy("api") == pytest.approx({"greet:v1": 0.7, "shout:v1": 0.3})
    handle = srv.get_handle("api")
    answers = {handle.remote(name="bob").result(WAIT) for _ in range(60)}
    assert answers == {"hello bob", "bob!"}


def test_registry_survives_sigkill_and_rerunning_the_script_is_a_no_op(
    store_url: str, spawn: Callable[..., Child], make_serve: Callable[..., Serve]
) -> None:
    first = spawn("build", store_url)
    assert json.loads(first.expect("READY"))["restored"] == []
    first.kill()

    srv = make_serve(kv_store_path=store_url)
    _check_deployment(srv)
    config = srv.get_backend_config("greet:v1")
    config.num_replicas = 3  # an operator scales at runtime
    srv.set_backend_config("greet:v1", config)
    srv.shutdown()

    again = spawn("build", store_url)  # the same deployment script, run again after a restart
    state = json.loads(again.expect("READY"))
    assert state["restored"] == ["greet:v1", "shout:v1"]
    assert state["num_replicas"] == 3  # identical code: the live config is kept
    assert state["traffic"] == pytest.approx({"greet:v1": 0.7, "shout:v1": 0.3})
    again.kill()


def test_two_processes_share_one_sqlite_file(
    tmp_path: Path, spawn: Callable[..., Child], make_serve: Callable[..., Serve]
) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    count = 25
    children = [spawn("fill", url, prefix, str(count)) for prefix in ("a", "b")]
    for child in children:
        child.expect("READY")
    for child in children:
        child.send("GO")
    for child in children:
        child.expect("DONE")
        assert child.proc.wait(timeout=WAIT) == 0
        child.close()

    store = SQLKVStore(url, "registry")
    with store.engine.connect() as conn:
        from sqlalchemy import text

        assert conn.execute(text("PRAGMA integrity_check")).scalar() == "ok"
    store.close()
    srv = make_serve(kv_store_path=url)
    expected = sorted(f"{p}{i}" for p in "ab" for i in range(count))
    assert sorted(srv.restored.endpoints) == expected
    assert sorted(srv.restored.traffic) == expected
    assert srv.get_handle("b7").remote(name="z").result(WAIT) == "echo z"



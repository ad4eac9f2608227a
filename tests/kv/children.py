"""Subprocesses of the KV tests (``python -m tests.kv.child``), read line by line with a timeout."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

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


def run_together(children: list[Child]) -> list[str]:
    """Start ``children`` at once (each waits for ``GO`` after ``READY``); returns each one's ``DONE`` line."""
    for child in children:
        child.expect("READY")
    for child in children:
        child.send("GO")
    done = []
    for child in children:
        done.append(child.expect("DONE"))
        assert child.proc.wait(timeout=WAIT) == 0
    return done

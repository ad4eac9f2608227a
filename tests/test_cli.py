"""The ``serve-core`` command, run as a subprocess on a free port."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from .conftest import WAIT, require
from .net import free_port, port_is_free

REPO = Path(__file__).resolve().parent.parent

APP = """
import serve_core as serve

serve.create_endpoint("echo", "/echo", methods=["GET", "POST"])
serve.create_backend(lambda request: "v1", "echo:v1")
serve.create_backend(lambda request: "v2", "echo:v2")
serve.split("echo", {"echo:v1": 0.5, "echo:v2": 0.5})
"""


def _cli(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "serve_core.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_banner(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """Read stdout up to the line naming the address; returns the URL and what was read."""
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        match = re.search(r"serving on (http://\S+)", line)
        if match:
            return match.group(1), "".join(seen)
    raise AssertionError(f"no banner; stderr: {proc.stderr.read() if proc.stderr else ''}")


def _wait_until_answering(url: str) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        try:
            requests.get(f"{url}/-/healthz", timeout=WAIT).raise_for_status()
            return
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # polling a condition under a deadline, not synchronisation


@contextlib.contextmanager
def _running(*args: str, cwd: Path) -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    """``serve-core run ...`` until its banner; yields the process, its URL and the banner."""
    proc = _cli("run", *args, cwd=cwd)
    try:
        yield (proc, *_wait_for_banner(proc))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


@pytest.fixture
def app_file(tmp_path: Path) -> Path:
    path = tmp_path / "deploy.py"
    path.write_text(textwrap.dedent(APP))
    return path


def test_run_serves_until_sigterm(app_file: Path, tmp_path: Path) -> None:
    with _running(str(app_file), "--port", "0", "--kv-store", str(tmp_path / "s.db"), cwd=tmp_path) as (proc, url, _):
        answers = {requests.get(f"{url}/echo", timeout=WAIT).text for _ in range(40)}
        assert answers == {"v1", "v2"}
        routes = subprocess.run(
            [sys.executable, "-m", "serve_core.cli", "routes", "--url", url],
            env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=WAIT,
        )
        assert json.loads(routes.stdout) == {"/echo": ["echo", ["GET", "POST"]]}
        stat = subprocess.run(
            [sys.executable, "-m", "serve_core.cli", "stat", "--url", url, "--json"],
            env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=WAIT,
        )
        stats = json.loads(stat.stdout)
        assert stats["echo:v1_request_counter"] + stats["echo:v2_request_counter"] == 40
        table = subprocess.run(
            [sys.executable, "-m", "serve_core.cli", "stat", "--url", url, "--window", "600"],
            env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=WAIT,
        ).stdout.splitlines()
        assert table[0].split() == ["endpoint", "requests", "errors", "waiting"]
        assert table[1].split() == ["echo", "40", "0", "0"]
        backend_head = table.index(next(line for line in table if line.startswith("backend")))
        assert table[backend_head].split()[:5] == ["backend", "requests", "errors", "p50", "ms"]
        rows = {line.split()[0]: line.split() for line in table[backend_head + 1:backend_head + 3]}
        assert int(rows["echo:v1"][1]) + int(rows["echo:v2"][1]) == 40
        assert "last 600 s" in table[-1] and len(table) < 10
        piped = subprocess.run(
            f"{sys.executable} -m serve_core.cli stat --url {url} --json | head -n 1",
            shell=True, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=WAIT,
        )
        assert piped.stdout == "{\n" and "Traceback" not in piped.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
        assert port_is_free(int(url.rsplit(":", 1)[1]))


def test_error_in_deployment_file_exits_non_zero(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import serve_core as serve\n\nraise RuntimeError('broken deployment')\n")
    proc = _cli("run", str(bad), "--port", "0", cwd=tmp_path)
    out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 1
    assert "Traceback" in err and "broken deployment" in err and "bad.py" in err


def test_query_of_unreachable_server_fails(tmp_path: Path) -> None:
    port = free_port()
    proc = _cli("routes", "--url", f"http://127.0.0.1:{port}", cwd=tmp_path)
    out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 1 and "cannot query" in err


def test_run_with_granian(app_file: Path, tmp_path: Path) -> None:
    require(importlib.util.find_spec("granian") is not None, "granian is not installed")
    port = free_port()
    with _running(str(app_file), "--port", str(port), "--server", "granian", cwd=tmp_path) as (proc, url, _):
        assert url == f"http://127.0.0.1:{port}"
        _wait_until_answering(url)  # Granian's worker prints the banner before the socket listens
        answers = {requests.get(f"{url}/echo", timeout=WAIT).text for _ in range(40)}
        assert answers == {"v1", "v2"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0


@pytest.mark.parametrize(("flag", "status"), [("auto", 404), ("on", 200)])
def test_the_dashboard_of_granian_workers_on_every_interface_needs_dashboard_on(
    app_file: Path, tmp_path: Path, flag: str, status: int
) -> None:
    require(importlib.util.find_spec("granian") is not None, "granian is not installed")
    port = free_port()
    args = (str(app_file), "--host", "0.0.0.0", "--port", str(port), "--server", "granian", "--dashboard", flag)
    with _running(*args, cwd=tmp_path) as (proc, url, _):
        local = f"http://127.0.0.1:{port}"
        _wait_until_answering(local)
        reply = requests.get(f"{local}/-/dashboard", timeout=WAIT)
        assert reply.status_code == status  # off by default: the workers are told the --host is not loopback
        if status == 404:
            assert "Serve(dashboard=True)" in reply.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0


LIMITS_APP = """
import threading
import serve_core as serve

gates = {}  # the Event is made on first use: backends are pickled into the store, an Event cannot be

def size(request):
    return len(request.get_data())

def slow(request):
    gates.setdefault("slow", threading.Event()).wait(30)
    return "late"

def release(request):
    gates.setdefault("slow", threading.Event()).set()
    return "released"

for backend in (size, slow, release):
    name = backend.__name__
    serve.create_endpoint(name, "/" + name, methods=["GET", "POST"])
    serve.create_backend(backend, name + ":v1")
    serve.link(name, name + ":v1")
"""


@pytest.mark.parametrize("server", ["werkzeug", "granian"])
def test_body_limit_and_request_timeout_flags(tmp_path: Path, server: str) -> None:
    if server == "granian":
        require(importlib.util.find_spec("granian") is not None, "granian is not installed")
    app = tmp_path / "limits.py"
    app.write_text(LIMITS_APP)
    port = str(free_port() if server == "granian" else 0)
    flags = ("--max-body-bytes", "10", "--request-timeout", "0.5", "--server", server, "--port", port)
    with _running(str(app), *flags, cwd=tmp_path) as (proc, url, _):
        _wait_until_answering(url)
        assert requests.post(f"{url}/size", data=b"x" * 10, timeout=WAIT).text == "10"
        assert requests.post(f"{url}/size", data=b"x" * 11, timeout=WAIT).status_code == 413
        assert requests.get(f"{url}/slow", timeout=WAIT).status_code == 504
        assert requests.get(f"{url}/release", timeout=WAIT).text == "released"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--max-body-bytes", "0"), ("--max-body-bytes", "ten"), ("--request-timeout", "-1"), ("--drain-timeout", "-1"),
     ("--drain-timeout", "soon")],
)
def test_bad_limit_flags_are_usage_errors(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    from serve_core.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["run", "app.py", flag, value])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def test_readme_example_serves(tmp_path: Path) -> None:
    with _running(str(REPO / "examples" / "echo.py"), "--port", "0", cwd=tmp_path) as (proc, url, _):
        answers = {requests.get(f"{url}/echo", timeout=WAIT).text for _ in range(40)}
        assert answers == {f"{url}/echo", "something new"}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(WAIT) == 0


def test_restart_restores_the_deployment_file_on_the_process_executor(tmp_path: Path) -> None:
    # Functions defined in the deployment file travel by value: into worker processes, and
    # through the SQLite store (signed) into the next run, which re-runs the file as a no-op.
    args = (str(REPO / "examples" / "echo.py"), "--port", "0", "--executor", "process")
    for run in ("first", "second"):
        with _running(*args, cwd=tmp_path) as (proc, url, banner):
            answers = {requests.get(f"{url}/echo", timeout=WAIT).text for _ in range(40)}
            assert answers == {f"{url}/echo", "something new"}, run
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(WAIT) == 0
    assert "restored 1 endpoint, 2 backends" in banner
    assert (tmp_path / "serve_core.db").exists()


DRAIN_APP = """
import os

import serve_core as serve

GATES = {gates!r}


def slow(request):
    with open(os.path.join(GATES, request.args["gate"])) as gate:  # blocks until the test opens it to write
        return gate.read()


serve.create_endpoint("slow", "/slow")
serve.create_backend(slow, "slow:v1")
serve.link("slow", "slow:v1")
"""


def _poll(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)  # polling a condition under a deadline, not synchronisation


def _sigterm_with_a_call_running_and_one_queued(tmp_path: Path, *server: str, while_draining: Any = None) -> None:
    """``serve-core run`` of the FIFO-gated app: SIGTERM with one call running and one queued.

    ``while_draining(url)`` runs after the signal, while the first call still holds its replica.
    Both calls must then be served, and the process exit 0.
    """
    for name in ("a", "b"):
        os.mkfifo(tmp_path / name)
    app = tmp_path / "drain.py"
    app.write_text(DRAIN_APP.format(gates=str(tmp_path)))
    port = free_port()
    args = (str(app), "--port", str(port), *server, "--kv-store", str(tmp_path / "s.db"), "--drain-timeout", "20")
    with _running(*args, cwd=tmp_path) as (proc, url, _):
        _wait_until_answering(url)  # Granian's worker prints the banner before the socket listens
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(requests.get, f"{url}/slow?gate=a", timeout=WAIT)
            with open(tmp_path / "a", "w") as gate_a:  # opens once the backend runs the first call
                queued = pool.submit(requests.get, f"{url}/slow?gate=b", timeout=WAIT)
                queue_size = "backend_slow:v1_queue_size"
                _poll(lambda: requests.get(f"{url}/-/stat", timeout=WAIT).json()[queue_size] == 1, "a queued call")
                proc.send_signal(signal.SIGTERM)
                if while_draining is not None:
                    while_draining(url)
                gate_a.write("first")
            with open(tmp_path / "b", "w") as gate_b:
                gate_b.write("second")
            assert (running.result(WAIT).status_code, running.result(WAIT).text) == (200, "first")
            assert (queued.result(WAIT).status_code, queued.result(WAIT).text) == (200, "second")
        assert proc.wait(WAIT) == 0


def test_sigterm_drains_queued_requests_under_granian(tmp_path: Path) -> None:
    """Granian stops accepting on SIGTERM and lets its running requests finish: queued calls are served."""
    require(importlib.util.find_spec("granian") is not None, "granian is not installed")
    _sigterm_with_a_call_running_and_one_queued(tmp_path, "--server", "granian")


def test_sigterm_drains_queued_requests(tmp_path: Path) -> None:
    def refuses_new_calls(url: str) -> None:
        _poll(lambda: requests.get(f"{url}/-/healthz", timeout=WAIT).status_code == 503, "the drain")
        assert requests.get(f"{url}/slow?gate=c", timeout=WAIT).status_code == 503

    _sigterm_with_a_call_running_and_one_queued(tmp_path, while_draining=refuses_new_calls)


def test_user_errors_are_one_line_without_a_traceback(app_file: Path, tmp_path: Path) -> None:
    missing = _cli("run", str(tmp_path / "nope.py"), "--port", "0", cwd=tmp_path)
    _, err = missing.communicate(timeout=WAIT)
    assert missing.returncode == 2
    assert err.strip().splitlines() == [f"serve-core: no such deployment file: {tmp_path / 'nope.py'}"]
    assert not (tmp_path / "serve_core.db").exists()  # checked before the store was opened
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        busy = _cli("run", str(app_file), "--port", str(port), "--kv-store", str(tmp_path / "s.db"), cwd=tmp_path)
        _, err = busy.communicate(timeout=WAIT)
    assert busy.returncode == 1
    (line,) = err.strip().splitlines()
    assert line.startswith(f"serve-core: cannot serve HTTP on 127.0.0.1:{port}") and "--port" in line
    assert "http_port" not in line


@pytest.mark.parametrize(
    ("store", "says"),
    [
        ("mysql+pymysql://user@127.0.0.1/db", "driver"),  # a driver that is not installed
        ("notadialect://x/y", "KV store"),  # a URL SQLAlchemy cannot use
        (f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test", "cannot"),  # nothing listens there
    ],
)
def test_store_errors_are_one_line_and_a_traceback_only_with_debug(
    app_file: Path, tmp_path: Path, store: str, says: str
) -> None:
    for command in (["run", str(app_file), "--port", "0", "--kv-store", store], ["status", "--kv-store", store]):
        proc = _cli(*command, cwd=tmp_path)
        _, err = proc.communicate(timeout=3 * WAIT)
        assert proc.returncode == 1, err
        (line,) = err.strip().splitlines()
        assert line.startswith("serve-core: ") and says in line and "Traceback" not in err
        debug = _cli(*command, "--debug", cwd=tmp_path)
        _, err = debug.communicate(timeout=3 * WAIT)
        assert debug.returncode == 1 and "Traceback" in err

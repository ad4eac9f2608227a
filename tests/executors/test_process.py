"""Process executor specifics: real worker processes, crashes, pickling, orphans.

The shared behaviour of every executor lives in the conformance tests; here are the
things only a process boundary can get wrong. Backends are defined inside the tests,
so cloudpickle ships them by value and workers never import this module (or pytest).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from werkzeug.test import EnvironBuilder

from serve_core import BackendConfig, Serve, accept_batch
from serve_core.errors import ReplicaDiedError, ServeError, ServeTypeError, ValidationError
from serve_core.executors._outcomes import RemoteTraceback
from serve_core.executors.base import Call, ReplicaSpec
from serve_core.executors.process import ProcessExecutor
from serve_core.http.request import ServeRequest

from ..conftest import WAIT
from ..procs import descendants, is_running, wait_until

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def psrv(make_serve: Callable[..., Serve]) -> Serve:
    return make_serve(executor="process")


def _serve_backend(srv: Serve, backend: Any, *init_args: Any, **config: Any) -> Any:
    srv.create_endpoint("ep")
    srv.create_backend(backend, "b", *init_args, backend_config=BackendConfig(**config))
    srv.link("ep", "b")
    return srv.get_handle("ep")


def _pids(handle: Any, count: int) -> set[int]:
    return {handle.remote().result(WAIT) for _ in range(count)}


def test_replicas_run_in_their_own_processes(psrv: Serve) -> None:
    def pid() -> int:
        return os.getpid()

    handle = _serve_backend(psrv, pid, num_replicas=2)
    pids = _pids(handle, 20)
    assert len(pids) == 2
    assert os.getpid() not in pids


def test_backend_is_built_once_per_replica(psrv: Serve) -> None:
    class Counter:
        def __init__(self, start: int) -> None:
            self.count = start

        def __call__(self) -> tuple[int, int]:
            self.count += 1
            return os.getpid(), self.count

    handle = _serve_backend(psrv, Counter, 10)
    answers = [handle.remote().result(WAIT) for _ in range(3)]
    assert [count for _, count in answers] == [11, 12, 13]
    assert len({pid for pid, _ in answers}) == 1


def test_context_is_set_in_the_worker(psrv: Serve) -> None:
    import serve_core as serve

    @accept_batch
    def ctx(flask_request: Any) -> list[tuple[bool, int | None]]:
        return [(serve.context.web, serve.context.batch_size)] * len(flask_request)

    handle = _serve_backend(psrv, ctx, max_batch_size=4)
    assert handle.remote().result(WAIT) == (False, 1)


def test_mixed_executors_in_one_instance(make_serve: Callable[..., Serve]) -> None:
    srv = make_serve(executor="thread")

    def pid() -> int:
        return os.getpid()

    srv.create_endpoint("local")
    srv.create_endpoint("remote")
    srv.create_backend(pid, "local:v1")
    srv.create_backend(pid, "remote:v1", backend_config=BackendConfig(executor="process"))
    srv.link("local", "local:v1")
    srv.link("remote", "remote:v1")
    assert srv.get_handle("local").remote().result(WAIT) == os.getpid()
    assert srv.get_handle("remote").remote().result(WAIT) != os.getpid()


def test_user_exception_keeps_type_and_remote_traceback(psrv: Serve) -> None:
    def fails(flask_request: Any, key: str) -> None:
        raise KeyError(key)

    handle = _serve_backend(psrv, fails)
    error = handle.remote(key="missing").exception(WAIT)
    assert type(error) is KeyError and error.args == ("missing",)
    assert isinstance(error.__cause__, RemoteTraceback)
    assert "in fails" in str(error.__cause__)


@pytest.mark.parametrize(
    ("crash", "expected"),
    [("sigkill", "SIGKILL"), ("os_exit", "code 3"), ("segfault", "SIGSEGV")],
)
def test_crash_fails_call_and_replica_is_replaced(psrv: Serve, crash: str, expected: str) -> None:
    def backend(flask_request: Any, crash: str = "") -> int:
        if crash == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif crash == "os_exit":
            os._exit(3)
        elif crash == "segfault":
            import ctypes

            ctypes.string_at(0)
        return os.getpid()

    handle = _serve_backend(psrv, backend)
    first_pid = handle.remote().result(WAIT)
    doomed = handle.remote(crash=crash)
    queued = handle.remote()  # waits behind the crash, then runs on the replacement
    error = doomed.exception(WAIT)
    assert isinstance(error, ReplicaDiedError) and expected in str(error)
    assert str(first_pid) in str(error)
    new_pid = queued.result(WAIT)
    assert new_pid != first_pid
    assert not is_running(first_pid)
    assert handle.remote().result(WAIT) == new_pid
    assert psrv.stat()["backend_b_num_replicas"] == 1


def test_replica_killed_from_outside_mid_call(psrv: Serve, tmp_path: Path) -> None:
    marker = tmp_path / "started"

    def backend(flask_request: Any, block: bool = False) -> int:
        if block:
            marker.write_text("x")
            threading.Event().wait()
        return os.getpid()

    handle = _serve_backend(psrv, backend)
    pid = handle.remote().result(WAIT)
    blocked = handle.remote(block=True)
    assert wait_until(marker.exists, WAIT)
    os.kill(pid, signal.SIGKILL)
    error = blocked.exception(WAIT)
    assert isinstance(error, ReplicaDiedError) and "SIGKILL" in str(error)
    assert handle.remote().result(WAIT) != pid


def test_constructor_error_raises_and_leaves_no_process(psrv: Serve) -> None:
    class Working:
        def __call__(self) -> str:
            return "ok"

    handle = _serve_backend(psrv, Working)  # the executor's fork server now runs: not a leftover
    before = descendants()

    class ConstructorError(Exception):
        pass

    class Broken:
        def __init__(self, reason: str) -> None:
            raise ConstructorError(reason)

        def __call__(self) -> str:
            return "never"

    with pytest.raises(ConstructorError, match="no model file") as info:
        psrv.create_backend(Broken, "broken", "no model file", backend_config=BackendConfig(num_replicas=2))
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "in __init__" in str(info.value.__cause__)
    assert descendants() - before == set()
    assert handle.remote().result(WAIT) == "ok"


def test_unpicklable_return_value(psrv: Serve) -> None:
    def backend(flask_request: Any, bad: bool = False) -> Any:
        return threading.Lock() if bad else "fine"

    handle = _serve_backend(psrv, backend)
    error = handle.remote(bad=True).exception(WAIT)
    assert isinstance(error, ServeError) and "lock" in str(error) and "picklable" in str(error)
    assert handle.remote().result(WAIT) == "fine"


def test_unpicklable_exceptions(psrv: Serve) -> None:
    class HoldsLock(Exception):
        def __init__(self) -> None:
            super().__init__("with a lock")
            self.lock = threading.Lock()

    class TwoArgs(Exception):
        def __init__(self, a: str, b: str) -> None:  # unpickling calls TwoArgs(a): fails
            super().__init__(a)

    def backend(flask_request: Any, kind: str = "") -> str:
        if kind == "lock":
            raise HoldsLock()
        if kind == "args":
            raise TwoArgs("a", "b")
        return "fine"

    handle = _serve_backend(psrv, backend)
    for kind, name in (("lock", "HoldsLock"), ("args", "TwoArgs")):
        error = handle.remote(kind=kind).exception(WAIT)
        assert type(error) is ServeError and name in str(error) and "cannot be sent back" in str(error)
        assert "in backend" in str(error.__cause__)
    assert handle.remote().result(WAIT) == "fine"


def test_unpicklable_argument_fails_only_its_query(psrv: Serve) -> None:
    def echo(flask_request: Any, value: Any = None) -> Any:
        return value

    handle = _serve_backend(psrv, echo)
    error = handle.remote(value=threading.Lock()).exception(WAIT)
    assert isinstance(error, ServeTypeError) and "picklable" in str(error)
    assert handle.remote(value=lambda: 5).result(WAIT)() == 5  # cloudpickle ships closures
    assert handle.remote(value=1).result(WAIT) == 1


def test_unpicklable_backend_is_rejected(psrv: Serve) -> None:
    class Holder:
        def __init__(self, lock: Any) -> None:
            self.lock = lock

        def __call__(self) -> None:
            return None

    with pytest.raises(ServeTypeError, match="cannot be sent to a worker process"):
        psrv.create_backend(Holder, "holder", threading.Lock())


def test_scale_down_stops_the_worker(psrv: Serve) -> None:
    def pid() -> int:
        return os.getpid()

    handle = _serve_backend(psrv, pid, num_replicas=2)
    pids = _pids(handle, 10)
    assert len(pids) == 2
    config = psrv.get_backend_config("b")
    config.num_replicas = 1
    psrv.set_backend_config("b", config)
    assert wait_until(lambda: sum(map(is_running, pids)) == 1, WAIT)
    (survivor,) = [p for p in pids if is_running(p)]
    assert _pids(handle, 5) == {survivor}


def test_web_request_travels_to_the_worker() -> None:
    def backend(request: Any) -> dict[str, Any]:
        return {
            "method": request.method,
            "url": request.url,
            "args": request.args.to_dict(),
            "json": request.get_json(),
            "header": request.headers.get("X-Test"),
        }

    executor = ProcessExecutor(start_method="spawn")
    spec = ReplicaSpec("web", "web#1", backend, (), BackendConfig())
    replica = executor.start_replica(spec)
    try:
        builder = EnvironBuilder(
            path="/echo", method="POST", query_string="a=1", json={"x": [1, 2]}, headers=[("X-Test", "yes")]
        )
        call = Call("__call__", True, False, (builder.get_request(ServeRequest),), ({},))
        (outcome,) = replica.submit(call).result(WAIT)
    finally:
        replica.stop(WAIT)
        executor.shutdown()
    assert outcome.ok, outcome.value
    assert outcome.value == {
        "method": "POST",
        "url": "http://localhost/echo?a=1",
        "args": {"a": "1"},
        "json": {"x": [1, 2]},
        "header": "yes",
    }


def test_unknown_start_method_is_rejected() -> None:
    with pytest.raises(ValidationError, match="start_method"):
        ProcessExecutor(start_method="fork")


_PARENT_SCRIPT = """
import os, sys
from serve_core import BackendConfig, Serve

def pid():
    return os.getpid()

if __name__ == "__main__":
    srv = Serve(start_server=False, executor="process")
    srv.create_endpoint("ep")
    srv.create_backend(pid, "b", backend_config=BackendConfig(num_replicas=2))
    srv.link("ep", "b")
    handle = srv.get_handle("ep")
    pids = {handle.remote().result(10) for _ in range(10)}
    print(" ".join(map(str, sorted(pids))), flush=True)
    if sys.argv[1] == "wait":
        sys.stdin.read()
"""


def _start_parent(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], list[int]]:
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(_PARENT_SCRIPT))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, str(script), mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2, "the parent script did not report its workers"
    return proc, pids


def test_workers_exit_when_parent_is_killed(tmp_path: Path) -> None:
    proc, pids = _start_parent(tmp_path, "wait")
    try:
        assert all(map(is_running, pids))
        proc.kill()
        proc.wait(WAIT)
        assert wait_until(lambda: not any(map(is_running, pids)), WAIT), "orphaned workers"
    finally:
        proc.kill()
        proc.communicate(timeout=WAIT)


def test_parent_exiting_without_shutdown_leaves_no_worker(tmp_path: Path) -> None:
    proc, pids = _start_parent(tmp_path, "exit")
    assert proc.wait(WAIT) == 0
    proc.communicate(timeout=WAIT)
    assert wait_until(lambda: not any(map(is_running, pids)), WAIT), "orphaned workers"


_UNGUARDED_SCRIPT = """
import sys

import serve_core as serve
from serve_core.executors.process import ProcessExecutor


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y


def add(flask_request, p=None, fail=False):
    if fail:
        raise ValueError("no such point")
    return Point(p.x + p.y, 0)


serve.init(executor=ProcessExecutor(start_method=sys.argv[1]), start_server=False)
serve.create_endpoint("add")
serve.create_backend(add, "add:v1")
serve.link("add", "add:v1")
handle = serve.get_handle("add")
result = handle.remote(p=Point(2, 3)).result(10)
print(type(result) is Point, result.x)
error = handle.remote(fail=True).exception(10)
print(repr(error))
print(error.__cause__)
serve.shutdown()
"""


def _run_script(tmp_path: Path, name: str, source: str, *args: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / name
    script.write_text(textwrap.dedent(source))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=WAIT * 3
    )


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_a_script_needs_no_main_guard(tmp_path: Path, start_method: str) -> None:
    done = _run_script(tmp_path, "unguarded.py", _UNGUARDED_SCRIPT, start_method)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stdout.splitlines()
    # A class of the script crosses both ways by value and comes back as itself.
    assert lines[:2] == ["True 5", "ValueError('no such point')"]
    line = _UNGUARDED_SCRIPT.splitlines().index('        raise ValueError("no such point")') + 1
    assert f'File "{tmp_path / "unguarded.py"}", line {line}, in add' in done.stdout
    assert 'raise ValueError("no such point")' in done.stdout


def test_worker_traceback_names_the_users_file_and_line(psrv: Serve) -> None:
    def fails(flask_request: Any) -> None:
        raise LookupError("not here")

    error = _serve_backend(psrv, fails).remote().exception(WAIT)
    assert isinstance(error, LookupError)
    text = str(error.__cause__)
    line = fails.__code__.co_firstlineno + 1
    assert f'File "{__file__}", line {line}, in fails' in text
    assert 'raise LookupError("not here")' in text  # the source line: the worker read the file
    assert "<dynamic-code>" not in text


_IMPORTED_MODULE = """
import serve_core as serve


def hello(flask_request):
    return "hello"


serve.init(executor="process", start_server=False)
serve.create_endpoint("hello")
serve.create_backend(hello, "hello:v1")
"""


def test_a_module_starting_serve_when_imported_fails_in_one_paragraph(tmp_path: Path) -> None:
    # The backend lives in an importable module, so it travels by reference: the worker
    # imports the module, whose top level would start workers of its own.
    (tmp_path / "appmod.py").write_text(textwrap.dedent(_IMPORTED_MODULE))
    done = _run_script(tmp_path, "main.py", """
        import sys
        from serve_core.errors import ServeStateError
        try:
            import appmod
        except ServeStateError as exc:
            print(exc, file=sys.stderr)
            sys.exit(1)
    """)
    assert done.returncode == 1, done.stdout + done.stderr
    line = _IMPORTED_MODULE.splitlines().index('serve.init(executor="process", start_server=False)') + 1
    assert done.stderr.startswith(f"{tmp_path / 'appmod.py'}, line {line} starts serve_core's process executor")
    assert "__main__" in done.stderr and len(done.stderr.splitlines()) == 1
    assert "Traceback" not in done.stderr


def _fork_servers() -> list[int]:
    """This process's fork servers (the workers they fork share their command line, not their parent)."""
    servers = []
    for pid in descendants():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()  # "pid (comm) state ppid ..."
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # it exited meanwhile
        if int(stat.rpartition(")")[2].split()[1]) == os.getpid() and b"fork-server" in cmdline:
            servers.append(pid)
    return servers


def test_a_dead_fork_server_is_replaced(psrv: Serve) -> None:
    def pid() -> int:
        return os.getpid()

    handle = _serve_backend(psrv, pid)
    worker = handle.remote().result(WAIT)
    (server,) = _fork_servers()
    os.kill(server, signal.SIGKILL)
    assert wait_until(lambda: not is_running(server), WAIT)
    assert handle.remote().result(WAIT) == worker  # its workers do not depend on it
    config = psrv.get_backend_config("b")
    config.num_replicas = 2
    psrv.set_backend_config("b", config)
    assert wait_until(lambda: len(_pids(handle, 10)) == 2, WAIT)
    assert len(_fork_servers()) == 1


def test_workers_do_not_import_the_tests(psrv: Serve) -> None:
    def imported() -> list[str]:
        import sys

        return sorted(name for name in sys.modules if name.startswith(("pytest", "tests", "_pytest")))

    assert _serve_backend(psrv, imported).remote().result(WAIT) == []


def test_replica_dying_while_idle_is_replaced(psrv: Serve) -> None:
    def pid() -> int:
        return os.getpid()

    handle = _serve_backend(psrv, pid)
    first = handle.remote().result(WAIT)
    os.kill(first, signal.SIGKILL)
    assert wait_until(lambda: not is_running(first), WAIT)
    # The router learns of the death from the next call, which fails; later calls run on a new worker.
    answers = [handle.remote() for _ in range(3)]
    outcomes = [f.exception(WAIT) or f.result(WAIT) for f in answers]
    assert all(isinstance(o, ReplicaDiedError) or (o != first and isinstance(o, int)) for o in outcomes)
    assert handle.remote().result(WAIT) not in (first, None)


def test_shutdown_drains_the_call_in_flight(psrv: Serve) -> None:
    def slow(flask_request: Any, n: int = 0) -> int:
        return sum(range(n))

    handle = _serve_backend(psrv, slow)
    in_flight = handle.remote(n=3_000_000)
    psrv.shutdown()
    assert in_flight.result(WAIT) == sum(range(3_000_000))


def test_one_unpicklable_result_in_a_batch_fails_only_its_query() -> None:
    @accept_batch
    def backend(requests: Any, bad: list[bool]) -> list[Any]:
        return [threading.Lock() if b else i for i, b in enumerate(bad)]

    executor = ProcessExecutor()
    replica = executor.start_replica(ReplicaSpec("batch", "batch#1", backend, (), BackendConfig()))
    try:
        kwargs = ({"bad": False}, {"bad": True}, {"bad": False})
        call = Call("__call__", False, True, (None, None, None), kwargs)
        outcomes = replica.submit(call).result(WAIT)
    finally:
        replica.stop(WAIT)
        executor.shutdown()
    assert [o.ok for o in outcomes] == [True, False, True]
    assert [outcomes[0].value, outcomes[2].value] == [0, 2]
    assert isinstance(outcomes[1].value, ServeError) and "lock" in str(outcomes[1].value)


def test_a_constructor_that_hangs_is_bounded() -> None:
    class Hangs:
        def __init__(self) -> None:
            threading.Event().wait()

        def __call__(self) -> None:
            return None

    executor = ProcessExecutor(start_timeout_s=0.5)
    try:
        with pytest.raises(ReplicaDiedError, match="did not build its backend within 0.5 s"):
            executor.start_replica(ReplicaSpec("h", "h#1", Hangs, (), BackendConfig()))
    finally:
        executor.shutdown()

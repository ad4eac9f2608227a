"""The process executor's worker processes: how they start, and what runs in them.

A worker is an interpreter that imports serve_core and never the user's main script, so
a script needs no ``if __name__ == "__main__":`` guard: the backend arrives by value
(cloudpickle), and the worker imports only the modules the backend names. Every worker
runs ``python -m serve_core.executors._worker`` in one of two roles:

* ``worker CONN_FD ALIVE_FD`` (start method ``spawn``): one worker, in this interpreter.
* ``fork-server CONTROL_FD`` (start method ``forkserver``, the default): this clean
  interpreter forks one worker per request on its control socket, so a replica starts in
  milliseconds. A request is one byte carrying three file descriptors: the worker's two
  pipe ends and a report pipe, on which the server writes the worker's pid, then its exit
  code (only a parent can wait for a child). The server stops when the control socket
  closes, once its workers are gone. :class:`ForkServer` is the parent's side.

A worker first reads a :class:`~serve_core.executors._wire.WorkerBoot` and takes on the
parent's ``sys.path``, working directory, ``argv``, process name and authkey. It builds its
backend once, answers :class:`~serve_core.executors._wire.Ready` (or a
:class:`~serve_core.executors._wire.Failure` when the constructor raised), then runs calls
one after the other until it reads ``Stop`` or the end of its pipe. An async backend is built
on a :class:`~serve_core.executors._loop.CallLoop` instead: this thread reads calls and
hands them to the loop, where they run concurrently and answer as they end, numbered
(``Ready(concurrent=True)``); ``Cancel`` cancels one, ``Stop`` lets them finish, the end of
the pipe cancels them.

A watchdog thread blocks on a second pipe whose other end only the parent holds: when
the parent dies, even by ``SIGKILL``, that pipe reaches end-of-file and the worker
exits at once, so no orphan outlives its server.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import os
import pickle
import select
import signal
import site
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NoReturn

from ..composition import ReplicaScope, enter_worker
from ..errors import ReplicaDiedError, ServeError, ServeStateError
from ..invoke import Invoker, is_async_target
from ..streams import Channel
from ._loop import CallLoop
from ._nested import WorkerPipe
from ._outcomes import dump_outcomes, remote_error
from ._pipe_stream import Sender, opened, serve_sync
from ._stream import generated_of
from ._wire import SEQ, Cancel, CloseStream, Credit, Failure, Ready, Stop, WorkerBoot, dumps
from .base import Call, Outcome

PARENT_GONE_EXIT_CODE = 70
"""Exit code of a worker whose parent died (EX_SOFTWARE)."""

CLOSE_TIMEOUT_S = 5.0
"""How long a closed fork server may take to exit before it is killed."""

LOADING_ENV = "SERVE_CORE_WORKER_LOADING"
"""Set, to the worker's pid, while a worker unpickles its backend (and imports what it names)."""

_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])


class StartedWhileLoading(ServeStateError):
    """A module imported to load a worker's backend starts process workers itself (a missing guard)."""


# ------------------------------------------------------------ the parent's side
def spawn_worker(conn: Connection, parent_alive: Connection) -> subprocess.Popen[bytes]:
    """A worker in a fresh interpreter, on the child ends of its pipes (start method ``spawn``)."""
    fds = (conn.fileno(), parent_alive.fileno())
    return _start_interpreter(["worker", *map(str, fds)], fds)


class ForkServer:
    """The parent's side of a fork server: one per executor, started with its first replica."""

    def __init__(self) -> None:
        self._control, theirs = socket.socketpair()
        try:
            self._process = _start_interpreter(["fork-server", str(theirs.fileno())], (theirs.fileno(),))
        except BaseException:
            self._control.close()
            raise
        finally:
            theirs.close()
        self._lock = threading.Lock()  # one request at a time on the control socket

    def poll(self) -> int | None:
        """The server's exit code, ``None`` while it runs."""
        return self._process.poll()

    def fork(self, conn: Connection, parent_alive: Connection, timeout: float) -> ForkedWorker:
        """A worker on the child ends of its pipes; returns once the server reported its pid.

        Raises:
            ReplicaDiedError: the server is gone or did not answer within ``timeout``.
        """
        report, theirs = multiprocessing.Pipe(duplex=False)
        try:
            with self._lock:
                socket.send_fds(self._control, [b"f"], [conn.fileno(), parent_alive.fileno(), theirs.fileno()])
        except OSError as exc:
            report.close()
            raise ReplicaDiedError(f"the process executor's fork server (pid {self._process.pid}) is gone") from exc
        finally:
            theirs.close()
        return ForkedWorker(report, timeout, self._process.pid)

    def close(self) -> None:
        """Close the control socket; the server exits once its last worker has."""
        self._control.close()
        try:
            self._process.wait(CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


class ForkedWorker:
    """A worker forked by a fork server, with the part of ``subprocess.Popen``'s interface a replica uses."""

    def __init__(self, report: Connection, timeout: float, server_pid: int) -> None:
        self._report = report
        self.returncode: int | None = None
        try:
            pid = report.recv_bytes() if report.poll(timeout) else b""
        except (EOFError, OSError):
            pid = b""
        if not pid:
            report.close()
            raise ReplicaDiedError(f"the process executor's fork server (pid {server_pid}) did not start a worker")
        self.pid = int(pid)

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code; ``None`` if the fork server died before it could tell.

        Raises:
            subprocess.TimeoutExpired: the worker still runs after ``timeout`` seconds.
        """
        if self._report.closed:
            return self.returncode
        if not self._report.poll(timeout):
            raise subprocess.TimeoutExpired(f"serve_core worker {self.pid}", timeout or 0)
        try:
            self.returncode = int(self._report.recv_bytes())
        except (EOFError, OSError):
            pass
        self._report.close()
        return self.returncode

    def kill(self) -> None:
        if self._report.closed or self._report.poll():
            return  # reaped (or about to be): the pid may not be this worker's any more
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


def _start_interpreter(args: list[str], fds: tuple[int, ...]) -> subprocess.Popen[bytes]:
    root = os.path.dirname(_PACKAGE_DIR)
    site_dirs = {os.path.realpath(d) for d in [*site.getsitepackages(), site.getusersitepackages()]}
    # -m puts the working directory first on the path: from a checkout (serve_core not installed
    # in a site directory), start there, so that the new interpreter imports this very serve_core.
    # A worker then moves to the parent's directory and path (WorkerBoot).
    return subprocess.Popen(
        [sys.executable, "-m", __name__, *args],
        pass_fds=fds,
        stdin=subprocess.DEVNULL,
        cwd=None if root in site_dirs else root,
    )


def refuse_while_loading() -> None:
    """Raise in a worker that is loading its backend: called before process workers start.

    A module that starts serve_core's process executor when it is imported would otherwise
    start workers from every worker that imports it, each of which imports it again.

    Raises:
        StartedWhileLoading: naming the module's line that does it.
    """
    if os.environ.get(LOADING_ENV) != str(os.getpid()):
        return
    frames = [f for f in traceback.extract_stack() if f.name == "<module>" and not f.filename.startswith(_PACKAGE_DIR)]
    where = f"{frames[-1].filename}, line {frames[-1].lineno}" if frames else "code run to load the backend"
    raise StartedWhileLoading(
        f"{where} starts serve_core's process executor when it is imported, and a worker process "
        "imported it to load its backend (a backend defined in an importable module is sent by "
        "reference). Put that code in a function, or under `if __name__ == '__main__':`."
    )


# ------------------------------------------------------------- the child's side
def main(argv: list[str]) -> None:
    """The command line: ``fork-server CONTROL_FD`` or ``worker CONN_FD ALIVE_FD``."""
    role, *fds = argv
    if role == "fork-server":
        _ForkServerLoop(socket.socket(fileno=_private(int(fds[0])))).run()
    elif role == "worker":
        run_worker(Connection(_private(int(fds[0]))), Connection(_private(int(fds[1]))))
    else:
        raise SystemExit(f"serve_core worker: unknown role {role!r}")


def _private(fd: int) -> int:
    os.set_inheritable(fd, False)  # a program the backend runs must not hold our pipes open
    return fd


def run_worker(conn: Connection, parent_alive: Connection) -> None:
    """Serve one replica over ``conn`` until ``Stop``, the end of the pipe, or the parent's death."""
    # Ctrl-C reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch_parent(parent_alive)
    try:
        boot: WorkerBoot = pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return  # the parent gave up on this worker before sending its backend
    _adopt(boot)
    pipe = WorkerPipe(conn, boot.instance_id)
    scope = None
    if pipe.link is not None:
        scope = ReplicaScope(pipe.link, boot.backend_tag)
        enter_worker(scope)  # handles unpickled here (and threads the backend starts) reach the parent
    served = _build(conn, boot, scope)
    if served is None:
        return
    try:
        if isinstance(served, CallLoop):
            _serve_concurrently(pipe, served)
        else:
            _serve(pipe, served)
    finally:
        if isinstance(served, Invoker):
            served.close()  # a CallLoop closes its own as it ends
        conn.close()


def _watch_parent(parent_alive: Connection) -> None:
    def watch() -> None:
        try:
            parent_alive.recv_bytes()
        except (EOFError, OSError):
            pass
        os._exit(PARENT_GONE_EXIT_CODE)  # the parent is gone: nobody will read our answers

    threading.Thread(target=watch, name="serve-parent-watchdog", daemon=True).start()


def _adopt(boot: WorkerBoot) -> None:
    sys.path[:] = boot.sys_path
    sys.argv[:] = boot.argv
    with contextlib.suppress(OSError):  # the directory may be gone; the worker does not need it
        os.chdir(boot.cwd)
    process = multiprocessing.current_process()
    process.name = boot.name
    process.authkey = boot.authkey


def _build(conn: Connection, boot: WorkerBoot, scope: ReplicaScope | None) -> Invoker | CallLoop | None:
    try:
        target, init_args = _load(boot.payload)
        served: Invoker | CallLoop
        if is_async_target(target):
            served = CallLoop(f"{boot.name}-loop")
            served.build(target, init_args, scope)
        else:
            served = Invoker(target, init_args, scope=scope)
    except StartedWhileLoading as exc:  # the message says it all; the worker's stack would bury it
        failure = Failure(ServeStateError(str(exc)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        failure = Failure(remote_error(exc))
    else:
        conn.send_bytes(dumps(Ready(os.getpid(), concurrent=isinstance(served, CallLoop))))
        return served
    conn.send_bytes(dumps(failure))
    conn.close()
    return None


def _load(payload: bytes) -> Any:
    os.environ[LOADING_ENV] = str(os.getpid())  # see refuse_while_loading
    try:
        return pickle.loads(payload)
    finally:
        del os.environ[LOADING_ENV]


def _serve(pipe: WorkerPipe, invoker: Invoker) -> None:
    kept: collections.deque[Any] = collections.deque()  # what arrived while a stream ran (_pipe_stream)
    seq = 0  # the call's number, as the parent counts them
    while True:
        if kept:
            message = kept.popleft()
        else:
            try:
                data = pipe.recv_bytes()
            except (EOFError, OSError):
                return
            try:
                message = pickle.loads(data)
            except Exception as exc:  # noqa: BLE001 - e.g. an argument's class is unknown here
                pipe.send_bytes(dumps(Failure(remote_error(exc))))
                seq += 1
                continue
        if isinstance(message, Stop):
            return
        if isinstance(message, (Credit, CloseStream)):
            continue  # for a stream that has ended
        outcomes = invoker.run(message)
        gen = generated_of(outcomes)
        if gen is None:
            pipe.send_bytes(dump_outcomes(outcomes))
        elif not serve_sync(pipe, seq, gen, kept):
            return
        seq += 1


def _serve_concurrently(pipe: WorkerPipe, calls: CallLoop) -> None:
    """Hand the calls read from the pipe to the loop, numbered; they answer from the loop's thread."""

    def send(seq: int, data: bytes) -> None:
        pipe.send_bytes(SEQ.pack(seq) + data)  # from the loop's thread, or this one for decoding failures

    senders: dict[int, Sender] = {}  # streams being sent, by call number (_pipe_stream)

    def answer(seq: int, size: int, outcomes: list[Outcome] | None) -> None:
        if outcomes is None:
            outcomes = [Outcome(False, ServeError("the worker's event loop ended before the call did"))] * size
        elif size == 1 and isinstance(outcomes[0].value, Channel):
            outcomes = _stream_from_loop(seq, outcomes[0].value, partial(send, seq), senders)
            if not outcomes:
                return  # sent with its stream
        send(seq, dump_outcomes(outcomes))

    seq, drain = 0, True
    while True:
        try:
            data = pipe.recv_bytes()
        except (EOFError, OSError):
            drain = False  # nobody reads our answers any more
            break
        try:
            message = pickle.loads(data)
        except Exception as exc:  # noqa: BLE001 - a call whose argument's class is unknown here
            send(seq, dumps(Failure(remote_error(exc))))
            seq += 1
            continue
        if isinstance(message, Stop):
            break
        if isinstance(message, Cancel):
            calls.cancel(message.seq)
        elif isinstance(message, (Credit, CloseStream)):
            sender = senders.get(message.seq)
            if sender is not None:
                sender.grant(message.count) if isinstance(message, Credit) else sender.close()
        elif isinstance(message, Call):
            if not calls.submit(seq, message, partial(answer, seq, len(message))):
                answer(seq, len(message), None)
            seq += 1
    calls.stop(None, drain=drain)


def _stream_from_loop(
    seq: int, channel: Channel, send: Callable[[bytes], None], senders: dict[int, Sender]
) -> list[Outcome]:
    """Answer call ``seq`` with its stream and start sending the rest; [] once sent, or the outcomes to send."""
    try:
        first = channel.read(0)  # the first item, or nothing: an empty generator (already closed)
    except BaseException as exc:  # noqa: BLE001 - the empty generator's finally failed
        return [Outcome(False, exc)]
    if not first:
        return opened([], True)
    sender = senders[seq] = Sender(seq, channel, send, partial(senders.pop, seq, None))
    send(dump_outcomes(opened(first, False)))
    sender.start(len(first))
    return []


class _ForkServerLoop:
    """The fork server: forks a worker per request and reports its pid, then its exit code."""

    def __init__(self, control: socket.socket) -> None:
        self._control = control
        self._reports: dict[int, Connection] = {}  # pid of a running worker -> its report pipe
        # SIGCHLD writes to this pipe (set_wakeup_fd), so one select() waits for requests and exits.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def run(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, _ignore_signal)  # a handler, not SIG_IGN, which would reap for us
        while True:
            readable, _, _ = select.select([self._control.fileno(), self._wake_r], [], [])
            if self._wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            self._reap(os.WNOHANG)
            if self._control.fileno() in readable and not self._serve_request():
                break
        self._reap(0)  # the parent closed the socket (or died): wait for the workers still running

    def _serve_request(self) -> bool:
        message, fds, _, _ = socket.recv_fds(self._control, 1, 3)
        if not message:
            return False
        if len(fds) != 3:  # not from our executor: drop it
            for fd in fds:
                os.close(fd)
            return True
        conn_fd, alive_fd, report_fd = fds
        report = Connection(report_fd, readable=False)
        try:
            pid = os.fork()
        except OSError:  # out of memory or processes: the closed report tells the parent
            pid = -1
        if pid == 0:
            report.close()
            self._run_child(conn_fd, alive_fd)
        os.close(conn_fd)
        os.close(alive_fd)
        if pid < 0:
            report.close()
            return True
        with contextlib.suppress(OSError):  # the parent stopped waiting; the exit is still reaped
            report.send_bytes(b"%d" % pid)
        self._reports[pid] = report
        return True

    def _run_child(self, conn_fd: int, alive_fd: int) -> NoReturn:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            self._control.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            for report in self._reports.values():
                report.close()
            run_worker(Connection(_private(conn_fd)), Connection(_private(alive_fd)))
            code = 0
        except SystemExit as exc:  # sys.exit() in the backend's constructor, say
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except BaseException:  # noqa: BLE001 - a forked child never returns into the server's loop
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)

    def _reap(self, options: int) -> None:
        while self._reports:
            try:
                pid, status = os.waitpid(-1, options)
            except ChildProcessError:
                return
            if pid == 0:
                return
            report = self._reports.pop(pid, None)
            if report is not None:
                with contextlib.suppress(OSError):
                    report.send_bytes(b"%d" % os.waitstatus_to_exitcode(status))
                report.close()


def _ignore_signal(signum: int, frame: Any) -> None:
    """SIGCHLD's handler: the wakeup pipe already woke the server's loop."""


if __name__ == "__main__":
    # Run the module under its own name, so that nothing a worker defines is ``__main__.x``.
    from serve_core.executors._worker import main as _main

    _main(sys.argv[1:])

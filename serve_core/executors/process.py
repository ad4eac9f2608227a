"""The process executor: one long-lived worker process per replica, on this machine.

For CPU-bound pure-Python backends, which the GIL serialises on the thread executor.
A worker is an interpreter that imports serve_core and never the user's main script
(see :mod:`._worker`), so a script needs no ``if __name__ == "__main__":`` guard. By
default the workers fork from the executor's own fork server, a clean interpreter started
once with ``python -m serve_core.executors._worker`` (a replica starts in milliseconds);
``start_method="spawn"`` starts a fresh interpreter per worker. The worker unpickles the
backend (function, or class and init args, shipped with cloudpickle), builds it once, and
runs calls sent over a pipe. In the parent, one reader thread per replica reads the
answers and resolves the futures: no thread per request.

An async backend's worker runs its calls concurrently on an event loop (see
:mod:`._loop`): up to ``max_concurrent_queries`` at once, answered as they end (numbered,
see :mod:`._wire`), and :meth:`ProcessReplica.cancel` sends it a ``Cancel`` for one.

Faults: a worker that dies (signal, ``os._exit``, segfault) fails the calls it held
with :class:`~serve_core.errors.ReplicaDiedError` naming the exit code or signal; the
router then asks for a replacement. A constructor that raises makes
:meth:`ProcessExecutor.start_replica` raise that error and leaves no process behind.
A worker exits by itself when its parent dies, even by ``SIGKILL``.
"""

from __future__ import annotations

import enum
import logging
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

import cloudpickle

from ..errors import NotDeliveredError, ReplicaDiedError, ServeError, ServeTypeError, ValidationError
from ..invoke import awaits_statically
from . import _worker
from ._nested import NESTED, NestedCalls
from ._pipe_stream import ParentStreams
from ._wire import SEQ, Cancel, Failure, Ready, Stop, StreamEnd, StreamItems, StreamOpened, WorkerBoot, dumps
from .base import Call, Outcome, ReplicaSpec

log = logging.getLogger("serve_core")

START_METHODS = ("forkserver", "spawn")
DEFAULT_START_TIMEOUT_S = 300.0  # building a backend may load a model: generous, but bounded
_TIMED_OUT = object()  # _first_message: no answer within the start timeout
EXIT_GRACE_S = 5.0  # a worker that closed its pipe gets this long to exit before SIGKILL

_SIGNAL_HINTS = {
    signal.SIGKILL: "killed from outside, often by the kernel's out-of-memory killer",
    signal.SIGSEGV: "a segmentation fault, usually a crash in native code",
    signal.SIGTERM: "terminated from outside",
}


class _Worker(Protocol):
    """A worker process as the replica sees it: ``subprocess.Popen``'s interface."""

    pid: int
    returncode: int | None

    def wait(self, timeout: float | None = None) -> int | None: ...

    def kill(self) -> None: ...


Launch = Callable[[Connection, Connection], _Worker]
"""Starts a worker process on the child ends of its two pipes."""


class _State(enum.Enum):
    RUNNING = "running"
    STOPPING = "stopping"
    DEAD = "dead"


class ProcessReplica:
    """A backend served by its own worker process.

    ``cancel`` is set for an async backend's worker only (see :class:`~.base.CancellableReplica`).
    """

    default_max_concurrent_queries = 1  # the original's rule: every waiting query stays in the EDF queue
    cancel: Callable[[Future[list[Outcome]]], bool] | None = None

    def __init__(self, spec: ReplicaSpec, launch: Launch, start_timeout_s: float) -> None:
        self.replica_id = spec.replica_id
        self._start_timeout = start_timeout_s
        boot = _boot(spec)
        self._conn, child_conn = multiprocessing.Pipe()
        alive_r, alive_w = multiprocessing.Pipe(duplex=False)
        try:
            self._process = launch(child_conn, alive_r)
        except BaseException:
            self._conn.close()
            alive_w.close()
            raise
        finally:
            child_conn.close()
            alive_r.close()
        # Closing alive_w tells the worker to exit: at stop, or when this object is dropped.
        self._release_worker = weakref.finalize(self, alive_w.close)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # keeps sends in the order of _inflight
        # Call number -> its future, size and method, in the order sent (a synchronous worker answers in it).
        self._inflight: dict[int, tuple[Future[list[Outcome]], int, str]] = {}
        self._sent = 0  # numbers the calls, as the worker counts them
        self._state = _State.RUNNING
        self._concurrent = False
        self._target = spec.target  # tells coroutine methods (cancellable) from the others
        self._streams = ParentStreams(self._send_quiet)
        self._nested = NestedCalls(spec.scope, self._send_nested)  # calls its backend makes (composition)
        self.pid: int = self._await_ready(boot)
        if self._concurrent:
            self.cancel = self._cancel
        self._reader = threading.Thread(
            target=self._read_loop, name=f"serve-replica-{spec.replica_id}-reader", daemon=True
        )
        self._reader.start()

    @property
    def alive(self) -> bool:
        return self._state is _State.RUNNING

    @property
    def serial(self) -> bool:
        """A synchronous backend's worker runs its calls one after the other (executors.base.SERIAL_ATTRIBUTE)."""
        return not self._concurrent

    # ------------------------------------------------------------- start-up
    def _await_ready(self, boot: bytes) -> int:
        try:
            self._send_boot(boot)
            message = self._first_message()
        except BaseException:  # e.g. KeyboardInterrupt while the constructor runs
            self._process.kill()
            self._abort()
            raise
        if isinstance(message, Ready):
            self._concurrent = message.concurrent
            return message.pid
        if message is _TIMED_OUT:
            self._process.kill()
        self._abort()
        if isinstance(message, Failure):
            raise message.error
        if message is _TIMED_OUT:
            raise ReplicaDiedError(
                f"replica {self.replica_id} did not build its backend within {self._start_timeout:g} s "
                "(a constructor that hangs?); its worker was killed"
            )
        raise ReplicaDiedError(
            _describe_exit(self.replica_id, self._process.pid, self._process.returncode)
            + " before its backend was built (its standard error may say why)"
        )

    def _send_boot(self, boot: bytes) -> None:
        try:
            self._conn.send_bytes(boot)
        except OSError:
            pass  # the worker is gone already: _first_message sees the end of the pipe

    def _first_message(self) -> Any:
        # The worker holds the only other end of the pipe (not inheritable): its exit ends the wait.
        if not wait([self._conn], self._start_timeout):
            return _TIMED_OUT
        try:
            return pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            return None  # died before answering
        except Exception as exc:  # noqa: BLE001 - the constructor's error did not unpickle here
            return Failure(ServeError(f"replica {self.replica_id} failed to start: {exc!r}"))

    def _abort(self) -> None:
        self._state = _State.DEAD
        self._reap()
        self._release_worker()
        self._conn.close()

    def _reap(self) -> None:
        """Wait for the worker that closed its pipe to exit; kill it when it lingers."""
        try:
            self._process.wait(EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    # ---------------------------------------------------------------- calls
    def submit(self, call: Call) -> Future[list[Outcome]]:
        """Send ``call`` to the worker; the future resolves when the worker answers."""
        future: Future[list[Outcome]] = Future()
        future.set_running_or_notify_cancel()
        data = self._encode(call)
        if not isinstance(data, bytes):
            future.set_result(data)  # a bad argument fails its queries, not the replica
            return future
        with self._send_lock:
            with self._lock:
                if self._state is not _State.RUNNING:
                    gone = NotDeliveredError(f"replica {self.replica_id} is {self._state.value}")
                    future.set_exception(gone)
                    return future
                self._inflight[self._sent] = (future, len(call), call.method)
                self._sent += 1
            try:
                self._conn.send_bytes(data)
            except OSError:
                pass  # the worker is gone; the reader sees the end of the pipe and fails the call
        return future

    def _encode(self, call: Call) -> bytes | list[Outcome]:
        try:
            return dumps(call)
        except Exception as exc:  # noqa: BLE001
            error = ServeTypeError(
                f"the call to replica {self.replica_id} cannot be sent to its worker process "
                f"({type(exc).__name__}: {exc}); pass picklable arguments"
            )
            error.__cause__ = exc
            return [Outcome(False, error)] * len(call)

    def _read_loop(self) -> None:
        while True:
            try:
                data = self._conn.recv_bytes()
            except (EOFError, OSError):
                break
            self._deliver(data)
        self._on_worker_exit()

    def _deliver(self, data: bytes) -> None:
        if data.startswith(NESTED):  # a call the backend makes, not an answer
            self._nested.receive(memoryview(data)[len(NESTED):])
            return
        payload: bytes | memoryview = data
        seq = -1
        if self._concurrent:
            seq = SEQ.unpack_from(data)[0]
            payload = memoryview(data)[SEQ.size:]
        try:
            message = pickle.loads(payload)
        except Exception as exc:  # noqa: BLE001 - e.g. a result class unknown in this process
            error = ServeError(f"the answer of replica {self.replica_id} cannot be unpickled here: {exc!r}")
            message = Failure(error)
        if type(message) is StreamItems or type(message) is StreamEnd:  # a stream's, not a call's answer
            self._streams.deliver(message)
            return
        with self._lock:
            if not self._concurrent:
                seq = next(iter(self._inflight), -1)
            entry = self._inflight.pop(seq, None)
        if entry is None:  # cannot happen with our worker; never kill the reader over it
            log.error("replica %s sent an answer nobody asked for", self.replica_id)
            return
        future, size, _ = entry
        if isinstance(message, Failure):
            message = [Outcome(False, message.error)] * size
        elif size == 1 and type(message[0].value) is StreamOpened:
            message = [Outcome(True, self._streams.open(seq, message[0].value))]
        future.set_result(message)

    def _send_quiet(self, message: Any) -> None:
        """Send a stream's credit or close; a worker that is gone needs neither."""
        with self._send_lock:
            try:
                self._conn.send_bytes(dumps(message))
            except OSError:
                pass

    def _on_worker_exit(self) -> None:
        self._reap()
        with self._lock:
            expected = self._state is _State.STOPPING
            self._state = _State.DEAD
            lost = list(self._inflight.values())
            self._inflight.clear()
        self._conn.close()
        self._nested.cancel_all()
        message = _describe_exit(self.replica_id, self._process.pid, self._process.returncode)
        self._streams.fail_all(ReplicaDiedError(message + " while it streamed"))
        if not lost:
            return
        if expected:
            message += " (it was being stopped and did not drain in time)"
        else:
            log.warning("%s", message)
        for future, _, _ in lost:
            future.set_exception(ReplicaDiedError(message))

    def _send_nested(self, data: bytes) -> bool:
        """Send the answer to a composed call; False when the worker is gone (nobody waits for it)."""
        if self._state is _State.DEAD:  # checked first: a callback may run under the lock on a dying replica
            return False
        with self._send_lock:
            try:
                self._conn.send_bytes(data)
            except OSError:
                return False
        return True

    def _cancel(self, future: Future[list[Outcome]]) -> bool:
        """Ask the worker to cancel the task of the call ``submit`` returned ``future`` for."""
        with self._send_lock:
            with self._lock:
                # At most max_concurrent_queries calls: a scan costs less than a second index per call.
                seq = next((n for n, (f, _, _) in self._inflight.items() if f is future), None)
                if seq is None or self._state is not _State.RUNNING:
                    return False
                if not awaits_statically(self._target, self._inflight[seq][2]):
                    return False  # synchronous code holds the worker's loop: nothing can interrupt it
            try:
                self._conn.send_bytes(dumps(Cancel(seq)))
            except OSError:
                return False  # the worker is gone; its calls fail with ReplicaDiedError
        return True

    # ------------------------------------------------------------- shutdown
    def stop(self, drain_timeout: float | None = None) -> None:
        """Let the worker finish the calls it holds, then exit; kill it after ``drain_timeout``."""
        with self._send_lock:
            with self._lock:
                running = self._state is _State.RUNNING
                if running:
                    self._state = _State.STOPPING
            if running:
                try:
                    self._conn.send_bytes(dumps(Stop()))
                except OSError:
                    pass  # already gone
        if threading.current_thread() is self._reader:
            return  # cannot wait for ourselves; the reader finishes after this callback
        if self._state is not _State.DEAD:  # a dead worker's reader is only reaping it
            self._reader.join(drain_timeout)
            if self._reader.is_alive():
                if drain_timeout:
                    log.warning("replica %s did not stop in %s s; killing it", self.replica_id, drain_timeout)
                self._process.kill()
        self._reader.join()
        self._release_worker()

    def __repr__(self) -> str:
        return f"<ProcessReplica {self.replica_id} pid={self.pid} {self._state.value}>"


class ProcessExecutor:
    """Starts one worker process per replica.

    Args:
        start_method: ``"forkserver"`` (default: workers fork from a clean interpreter
            that imported serve_core once, so replicas start fast) or ``"spawn"`` (a fresh
            interpreter per worker). Neither runs the user's main script.
        start_timeout_s: how long a worker may take to build its backend before it is
            killed and ``start_replica`` fails.
    """

    name = "process"
    places_replicas = False

    def __init__(
        self, start_method: str | None = None, start_timeout_s: float = DEFAULT_START_TIMEOUT_S
    ) -> None:
        _worker.refuse_while_loading()
        available = START_METHODS if hasattr(os, "fork") else ("spawn",)
        if start_method is None:
            start_method = available[0]
        if start_method not in available:
            raise ValidationError(f"start_method must be one of {list(available)}, got {start_method!r}")
        self._start_method = start_method
        self._start_timeout = start_timeout_s
        self._fork_server: _worker.ForkServer | None = None  # started with the first replica
        self._lock = threading.Lock()
        self._replicas: weakref.WeakSet[ProcessReplica] = weakref.WeakSet()

    def start_replica(self, spec: ReplicaSpec) -> ProcessReplica:
        """Start a worker process and build the backend in it.

        Raises:
            ServeTypeError: the backend cannot be pickled.
            Exception: the error the backend's constructor raised (its type is kept).
        """
        replica = ProcessReplica(spec, self._launch, self._start_timeout)
        self._replicas.add(replica)
        return replica

    def shutdown(self) -> None:
        """Stop replicas nobody stopped (normally none are left), then the fork server."""
        for replica in list(self._replicas):
            replica.stop(0)
        with self._lock:
            server, self._fork_server = self._fork_server, None
        if server is not None:
            server.close()

    def _launch(self, conn: Connection, alive: Connection) -> _Worker:
        if self._start_method == "spawn":
            return _worker.spawn_worker(conn, alive)
        with self._lock:
            if self._fork_server is None or self._fork_server.poll() is not None:
                if self._fork_server is not None:
                    log.warning("the fork server of the process executor died; starting a new one")
                    self._fork_server.close()
                self._fork_server = _worker.ForkServer()
            server = self._fork_server
        return server.fork(conn, alive, self._start_timeout)


def _boot(spec: ReplicaSpec) -> bytes:
    try:
        payload = cloudpickle.dumps((spec.target, spec.init_args), pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001
        raise ServeTypeError(
            f"backend {spec.backend_tag!r} cannot be sent to a worker process: {type(exc).__name__}: "
            f"{exc}; the process executor needs a backend and init args that cloudpickle can pickle"
        ) from exc
    process = multiprocessing.current_process()
    boot = WorkerBoot(
        payload=payload,
        name=f"serve-replica-{spec.replica_id}",
        sys_path=tuple(p for p in sys.path if isinstance(p, str)),
        cwd=os.getcwd(),
        argv=tuple(sys.argv),
        authkey=bytes(process.authkey),
        instance_id=spec.scope.link.instance_id if spec.scope is not None else "",
        backend_tag=spec.backend_tag,
    )
    return pickle.dumps(boot, pickle.HIGHEST_PROTOCOL)


def _describe_exit(replica_id: str, pid: int | None, exitcode: int | None) -> str:
    head = f"the worker process (pid {pid}) of replica {replica_id}"
    if exitcode is None:
        return f"{head} exited; its exit code is unknown (the executor's fork server died first)"
    if exitcode >= 0:
        return f"{head} exited unexpectedly with code {exitcode}"
    try:
        sig = signal.Signals(-exitcode)
    except ValueError:
        return f"{head} was terminated by signal {-exitcode}"
    hint = _SIGNAL_HINTS.get(sig, "a signal from outside or a crash")
    return f"{head} was terminated by {sig.name} ({-exitcode}); likely cause: {hint}"

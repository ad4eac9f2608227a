"""The child side of the process executor: the main function of a worker process.

A worker builds its backend once, answers :class:`~serve_core.executors._wire.Ready`
(or a :class:`~serve_core.executors._wire.Failure` when the constructor raised), then
runs calls one after the other until it reads ``Stop`` or the end of its pipe.

A watchdog thread blocks on a second pipe whose other end only the parent holds: when
the parent dies, even by ``SIGKILL``, that pipe reaches end-of-file and the worker
exits at once, so no orphan outlives its server.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
from multiprocessing.connection import Connection

from ..invoke import Invoker
from ._outcomes import dump_outcomes, remote_error
from ._wire import Failure, Ready, Stop, WorkerBoot, dumps

PARENT_GONE_EXIT_CODE = 70
"""Exit code of a worker whose parent died (EX_SOFTWARE)."""


def worker_main(conn: Connection, parent_alive: Connection, boot: WorkerBoot) -> None:
    """Entry point of a worker process (run by ``multiprocessing``)."""
    # Ctrl-C reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch_parent(parent_alive)
    invoker = _build(conn, boot)
    if invoker is None:
        return
    try:
        _serve(conn, invoker)
    finally:
        invoker.close()
        conn.close()


def _watch_parent(parent_alive: Connection) -> None:
    def watch() -> None:
        try:
            parent_alive.recv_bytes()
        except (EOFError, OSError):
            pass
        os._exit(PARENT_GONE_EXIT_CODE)  # the parent is gone: nobody will read our answers

    threading.Thread(target=watch, name="serve-parent-watchdog", daemon=True).start()


def _build(conn: Connection, boot: WorkerBoot) -> Invoker | None:
    try:
        target, init_args = pickle.loads(boot.payload)
        invoker = Invoker(target, init_args)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send_bytes(dumps(Failure(remote_error(exc))))
        conn.close()
        return None
    conn.send_bytes(dumps(Ready(os.getpid())))
    return invoker


def _serve(conn: Connection, invoker: Invoker) -> None:
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            message = pickle.loads(data)
        except Exception as exc:  # noqa: BLE001 - e.g. an argument's class is unknown here
            conn.send_bytes(dumps(Failure(remote_error(exc))))
            continue
        if isinstance(message, Stop):
            return
        conn.send_bytes(dump_outcomes(invoker.run(message)))

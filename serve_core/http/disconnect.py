"""Noticing that a client went away while its request waits for the backend (the standalone server).

A request that waits for its answer has nothing to read or write on its connection, so a
client that closes it goes unnoticed until the answer is written. :class:`DisconnectWatcher`
is one thread per server watching the sockets of waiting requests with ``epoll``: a peer
that closed (or reset) its end runs the request's callback, which cancels its call
(:meth:`ServeFuture.cancel <serve_core.queues.ServeFuture.cancel>`: withdrawn if queued, the task
cancelled if it is a running async call). Bytes arriving instead (a pipelined next request)
end the watch: whether the client is still there cannot be told then.

The server offers it to the app under the environ key :data:`ON_DISCONNECT`: a function
taking the callback and returning a function that ends the watch (or ``None`` when the
connection cannot be watched: its request body was not read to its end). Linux only
(``epoll``); elsewhere the key is absent and a request whose client left runs to its end.
"""

from __future__ import annotations

import os
import select
import socket
import threading
from collections.abc import Callable

ON_DISCONNECT = "serve_core.on_disconnect"
"""Environ key of ``watch(callback) -> unwatch | None`` (see the module docstring)."""

WATCH_AFTER_S = 0.05
"""An HTTP call not answered within this long watches its connection (quicker ones never pay for it)."""

_GONE = getattr(select, "EPOLLRDHUP", 0) | getattr(select, "EPOLLHUP", 0) | getattr(select, "EPOLLERR", 0)


def available() -> bool:
    return hasattr(select, "epoll")


class DisconnectWatcher:
    """Watches sockets for a peer that closed; one thread, started at once, ended by :meth:`close`."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._lock = threading.Lock()
        self._watched: dict[int, Callable[[], None]] = {}
        self._wake_r, self._wake_w = os.pipe()
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name="serve-http-disconnects", daemon=True)
        self._thread.start()

    def watch(self, sock: socket.socket, callback: Callable[[], None]) -> Callable[[], None]:
        """Run ``callback`` (on the watcher's thread) if the peer of ``sock`` closes; returns the unwatch."""
        fd = sock.fileno()
        with self._lock:
            self._watched[fd] = callback
            try:
                self._epoll.register(fd, select.EPOLLIN | _GONE)
            except OSError:  # closed meanwhile, or watched already
                del self._watched[fd]
        return lambda: self._unwatch(fd, callback)

    def _unwatch(self, fd: int, callback: Callable[[], None]) -> None:
        with self._lock:
            if self._watched.get(fd) is not callback:
                return  # fired, or another request's watch
            del self._watched[fd]
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass

    def _run(self) -> None:
        while True:
            for fd, mask in self._epoll.poll():
                if fd == self._wake_r:
                    return
                with self._lock:
                    callback = self._watched.pop(fd, None)
                    if callback is not None:
                        try:
                            self._epoll.unregister(fd)
                        except OSError:
                            pass
                if callback is not None and (mask & _GONE or _peer_closed(fd)):
                    callback()

    def close(self) -> None:
        os.write(self._wake_w, b"x")
        self._thread.join()
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


def _peer_closed(fd: int) -> bool:
    """Whether a readable socket is at its end (or reset), without taking any byte from it."""
    sock = socket.socket(fileno=os.dup(fd))
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.close()

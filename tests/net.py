"""Small network helpers of the tests (loopback only)."""

from __future__ import annotations

import socket


def port_is_free(port: int) -> bool:
    """Whether nothing listens on ``127.0.0.1:port`` (a bind succeeds).

    With ``SO_REUSEADDR``, as servers bind: connections the server closed (kept-alive ones it
    ended) linger in TIME_WAIT on that port, which only a listener should count as taking it.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])

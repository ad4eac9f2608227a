"""Small network helpers of the tests (loopback only)."""

from __future__ import annotations

import socket


def port_is_free(port: int) -> bool:
    """Whether nothing listens on ``127.0.0.1:port`` (a bind succeeds)."""
    with socket.socket() as sock:
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

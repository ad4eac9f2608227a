"""``serve.context``: what the running call is (web or Python, batch size).

Backed by ``contextvars`` so concurrent calls on threads or asyncio tasks each see
their own values. Executors enter :func:`call_context` around the user call.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_web: contextvars.ContextVar[bool] = contextvars.ContextVar("serve_web", default=False)
_batch_size: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "serve_batch_size", default=None
)


class _Context:
    """Read-only view of the current call's context."""

    __slots__ = ()

    @property
    def web(self) -> bool:
        """True while running a call that came from HTTP."""
        return _web.get()

    @property
    def batch_size(self) -> int | None:
        """Length of the current batch, or None outside batch mode."""
        return _batch_size.get()

    def __repr__(self) -> str:
        return f"serve.context(web={self.web}, batch_size={self.batch_size})"


context = _Context()


@contextlib.contextmanager
def call_context(web: bool, batch_size: int | None) -> Iterator[None]:
    """Set ``serve.context`` for the duration of one user call."""
    web_token = _web.set(web)
    batch_token = _batch_size.set(batch_size)
    try:
        yield
    finally:
        _batch_size.reset(batch_token)
        _web.reset(web_token)

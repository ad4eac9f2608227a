"""``serve.context``: what the running call is (web or Python, batch size).

Backed by ``contextvars`` so concurrent calls on threads or asyncio tasks each see
their own values. Executors enter :func:`call_context` around the user call.
"""

from __future__ import annotations

import contextvars

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


class call_context:
    """Set ``serve.context`` for the duration of one user call.

    A plain class rather than ``@contextmanager``: it is entered on every call, and a
    generator-based context manager costs several times more.
    """

    __slots__ = ("_web", "_batch_size", "_tokens")

    def __init__(self, web: bool, batch_size: int | None) -> None:
        self._web = web
        self._batch_size = batch_size

    def __enter__(self) -> None:
        if _web.get() is self._web and _batch_size.get() == self._batch_size:
            self._tokens = None  # already so (the common case: a Python call on a replica's thread)
        else:
            self._tokens = (_web.set(self._web), _batch_size.set(self._batch_size))

    def __exit__(self, *exc_info: object) -> None:
        if self._tokens is not None:
            web_token, batch_token = self._tokens
            _batch_size.reset(batch_token)
            _web.reset(web_token)

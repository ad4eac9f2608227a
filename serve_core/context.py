"""``serve.context``: what the running call is (web or Python, batch size, request id).

Backed by ``contextvars`` so concurrent calls on threads or asyncio tasks each see
their own values. Executors enter :func:`call_context` around the user call.
"""

from __future__ import annotations

import contextvars

_web: contextvars.ContextVar[bool] = contextvars.ContextVar("serve_web", default=False)
_batch_size: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "serve_batch_size", default=None
)
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("serve_request_id", default=None)


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

    @property
    def request_id(self) -> str | None:
        """The ``X-Request-ID`` of the HTTP request being served (taken from the client, or generated).

        None for Python calls, in batch mode (each request of the batch carries its own in
        its ``X-Request-ID`` header) and when the instance does not assign request ids.
        """
        return _request_id.get()

    def __repr__(self) -> str:
        return f"serve.context(web={self.web}, batch_size={self.batch_size}, request_id={self.request_id!r})"


context = _Context()


class call_context:
    """Set ``serve.context`` for the duration of one user call.

    A plain class rather than ``@contextmanager``: it is entered on every call, and a
    generator-based context manager costs several times more.
    """

    __slots__ = ("_web", "_batch_size", "_request_id", "_tokens")

    def __init__(self, web: bool, batch_size: int | None, request_id: str | None = None) -> None:
        self._web = web
        self._batch_size = batch_size
        self._request_id = request_id

    def __enter__(self) -> None:
        if _web.get() is self._web and _batch_size.get() == self._batch_size and _request_id.get() is self._request_id:
            self._tokens = None  # already so (the common case: a Python call on a replica's thread)
        else:
            self._tokens = (_web.set(self._web), _batch_size.set(self._batch_size), _request_id.set(self._request_id))

    def __exit__(self, *exc_info: object) -> None:
        if self._tokens is not None:
            web_token, batch_token, id_token = self._tokens
            _request_id.reset(id_token)
            _batch_size.reset(batch_token)
            _web.reset(web_token)

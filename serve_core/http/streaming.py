"""Streamed responses: a generator backend's items as a chunked HTTP body (docs/streaming.md).

A web call whose backend returned a generator is answered with an
:class:`~serve_core.streams.ItemStream` at its first item; the front sends it as it comes:

* **Plain** (the default): each item encoded by the result rules, ``str`` as UTF-8, ``bytes``
  raw, anything else one JSON document per line. The media type is chosen by the first item:
  ``text/plain; charset=utf-8`` (str), ``application/octet-stream`` (bytes), else
  ``application/x-ndjson``. No ``Content-Length``: HTTP/1.1 bodies are chunked.
* **Server-Sent Events**, when the request's ``Accept`` has ``text/event-stream``: each item
  is one event, its text (str, bytes as UTF-8, else JSON) in ``data:`` lines.

Each write carries what the stream holds at that moment (one item or several), so the first
byte leaves as soon as the first item exists. A stream that fails mid-way is logged with an
error id (and its traceback); a plain body then ends without its terminating chunk (the
client sees a truncated body: :class:`StreamBroken` is raised to the WSGI server), an SSE body
with an ``event: error`` whose data is ``{"error_id": ...}``. No traceback goes to the client.
A client that goes away closes the stream (the server closes the body iterable, or the RSGI
transport fails), which stops the generator in its replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Generator, Iterator
from typing import Any

from .. import recent_errors
from ..streams import ItemStream
from .responses import json_body

log = logging.getLogger("serve_core.http")

NDJSON = "application/x-ndjson"
SSE = "text/event-stream; charset=utf-8"
_LINES = re.compile(r"\r\n|\r|\n")


class StreamBroken(Exception):
    """A streamed body failed mid-way (logged with ``error_id``): the server ends the body unterminated."""

    def __init__(self, error_id: str) -> None:
        super().__init__(f"the stream failed (error id {error_id}); the server log has the details")
        self.error_id = error_id


def wants_events(accept: str | None) -> bool:
    """Whether an ``Accept`` header asks for Server-Sent Events."""
    return bool(accept) and "text/event-stream" in accept  # type: ignore[operator]


def encode_item(item: Any) -> bytes:
    """One item of a plain stream (the result rules; JSON items end with a newline)."""
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    return json_body(item) + b"\n"


def encode_event(item: Any) -> bytes:
    """One item as a Server-Sent Event: its text in ``data:`` lines, then a blank line."""
    if isinstance(item, bytes):
        text = item.decode("utf-8", errors="replace")
    elif isinstance(item, str):
        text = item
    else:
        text = json_body(item).decode("utf-8")
    return "".join(f"data: {line}\n" for line in _LINES.split(text)).encode("utf-8") + b"\n"


def error_event(error_id: str) -> bytes:
    return b"event: error\ndata: " + json.dumps({"error_id": error_id}).encode() + b"\n\n"


def content_type(first: Any, events: bool) -> str:
    if events:
        return SSE
    if isinstance(first, str):
        return "text/plain; charset=utf-8"
    if isinstance(first, bytes):
        return "application/octet-stream"
    return NDJSON


def stream_failed(exc: BaseException, where: str) -> str:
    """Log a stream that failed mid-way; its error id."""
    error_id = recent_errors.error_id(exc)  # the dashboard's recent errors show it under this id too
    log.error("%s: the stream failed mid-way (error id %s)", where, error_id, exc_info=exc)
    return error_id


class StreamResponse:
    """A WSGI response sending a stream's items as they come (``headers`` may be added to, as a ``PlainResponse``'s).

    Args:
        stream: the stream, answered at its first item.
        events: send Server-Sent Events.
        where: names the request in the log (``"GET /path"``).
        item_timeout_s: the longest wait for the next item (then the stream fails); None: no limit.
    """

    status_code = 200

    def __init__(self, stream: ItemStream, *, events: bool, where: str, item_timeout_s: float | None) -> None:
        self._stream = stream
        self._events = events
        self._where = where
        self._timeout = item_timeout_s
        self._pending = stream.read(item_timeout_s)  # the first item is there already
        first = self._pending[0] if self._pending else ""
        self.headers = [("Content-Type", content_type(first, events)), ("Cache-Control", "no-cache")]
        if events:
            self.headers.append(("X-Accel-Buffering", "no"))  # proxies (nginx) must not hold events back

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", self.headers)
        if environ.get("REQUEST_METHOD") == "HEAD":
            self._stream.close()
            return iter(())
        return _Body(self)

    def chunks(self) -> Generator[bytes, None, None]:
        """The body, chunk by chunk (a failure ends it as the module docstring says)."""
        encode = encode_event if self._events else encode_item
        items, self._pending = self._pending, []
        while True:
            if items:
                yield b"".join([encode(item) for item in items])
            try:
                items = self._stream.read(self._timeout)
            except BaseException as exc:  # noqa: BLE001 - the generator's failure, or no item in time
                self._stream.close()
                error_id = stream_failed(exc, self._where)
                if not self._events:
                    raise StreamBroken(error_id) from None
                yield error_event(error_id)
                return
            if not items:
                return

    def close(self) -> None:
        self._stream.close()


class _Body:
    """The body iterable: its ``close()`` (the WSGI server's, when the client left too) closes the stream."""

    def __init__(self, response: StreamResponse) -> None:
        self._chunks = response.chunks()
        self._response = response

    def __iter__(self) -> _Body:
        return self

    def __next__(self) -> bytes:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()
        self._response.close()


async def send_stream(
    transport: Any, stream: ItemStream, first: list[Any], events: bool, where: str, item_timeout_s: float | None
) -> None:
    """Send a stream on an RSGI stream transport (``proto.response_stream``); closes the stream at the end.

    A transport that fails (the client went away) ends the sending and closes the stream; no next
    item within ``item_timeout_s`` fails the stream.
    """
    encode = encode_event if events else encode_item
    items: list[Any] | str = first
    try:
        while items:
            if isinstance(items, str):  # the stream failed: its error id
                if events:
                    await transport.send_bytes(error_event(items))
                return  # a plain body ends normally: Granian's transport cannot cut it
            await transport.send_bytes(b"".join([encode(item) for item in items]))
            items = await _next(stream, where, item_timeout_s)
    finally:
        stream.close()


async def _next(stream: ItemStream, where: str, timeout: float | None) -> list[Any] | str:
    """The next items, or the error id of the stream's failure (logged).

    Caught here, not in :func:`send_stream`: the error (kept by the recent errors) must not
    hold a frame that holds Granian's transport, which ends the response only once it is freed.
    """
    try:
        return await asyncio.wait_for(stream.aread(), timeout)
    except asyncio.TimeoutError:
        return stream_failed(TimeoutError(f"no stream item within {timeout} s"), where)
    except Exception as exc:  # noqa: BLE001 - the generator's failure
        return stream_failed(exc, where)

"""Streams over the process executor's pipe: a worker's generator, item by item, with a credit window.

Call number n that returns a generator is answered (as any call) with one outcome whose value
is a :class:`~._wire.StreamOpened` holding the first item; then the worker sends
:class:`~._wire.StreamItems` and finally one :class:`~._wire.StreamEnd` (after the generator
was closed, so its ``finally`` ran). It never has more than :data:`~._wire.STREAM_WINDOW`
items in flight: the parent grants :class:`~._wire.Credit` as its reader takes them, so a
slow reader holds the producer back. A reader that closes the stream sends
:class:`~._wire.CloseStream`, which closes the generator in the worker.

* A synchronous worker pumps the generator on a thread into a local channel
  (:func:`~._stream.pump`, :func:`serve_sync`), an async worker on its loop
  (:func:`~._stream.apump`); a :class:`Sender` thread per stream moves the items to the pipe,
  as many per message as are ready. The worker's main thread reads credits and closes; a
  synchronous worker keeps what else arrives meanwhile (the next calls, ``Stop``) for after the
  stream, in order, as without streams.
* :class:`ParentStreams` is the parent's side: one :class:`~serve_core.streams.Channel` per
  stream, fed by the replica's reader thread, failed with the replica's death.
"""

from __future__ import annotations

import collections
import pickle
import threading
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import ServeError
from ..invoke import Generated
from ..streams import Channel
from ._outcomes import dump_outcomes, remote_error
from ._stream import open_stream, pump
from ._wire import STREAM_WINDOW, CloseStream, Credit, StreamEnd, StreamItems, StreamOpened, dumps
from .base import Outcome

Send = Callable[[Any], None]  # sends one message (pickled here) for a stream


def opened(first: list[Any], ended: bool) -> list[Outcome]:
    return [Outcome(True, StreamOpened(first, ended))]


def _items(seq: int, items: list[Any]) -> bytes:
    try:
        return dumps(StreamItems(seq, items))
    except Exception as exc:  # noqa: BLE001 - an item that cannot cross: the stream ends with why
        raise ServeError(
            f"a stream item of type {type(items[0]).__name__} cannot be sent back from the worker "
            f"({type(exc).__name__}: {exc}); yield picklable items"
        ) from exc


# ------------------------------------------------------------- a synchronous worker
class PipeEnd(Protocol):
    """The worker's end of its pipe as a stream uses it (a ``Connection``, or the worker's ``WorkerPipe``)."""

    def send_bytes(self, data: bytes) -> None: ...

    def recv_bytes(self) -> bytes: ...

    def poll(self, timeout: float | None = ...) -> bool: ...


def serve_sync(conn: PipeEnd, seq: int, gen: Generated, kept: collections.deque[Any]) -> bool:
    """Stream call ``seq``'s generator; False when the pipe ended meanwhile.

    The generator runs on a thread of its own into a local channel and a :class:`Sender` moves
    its items to the pipe (as many per message as are ready), while this thread reads the
    parent's credits and close; other messages are appended to ``kept``, for after the stream.
    """
    outcome, channel = open_stream(gen)
    if not outcome.ok:
        conn.send_bytes(dump_outcomes([outcome]))
        return True
    first = outcome.value.read(0)
    conn.send_bytes(dump_outcomes(opened(first, channel is None)))
    if channel is None:
        return True
    # Set by the sender before it sends the stream's end: a call the parent sends after that end
    # wakes this thread, which then serves it (so this wait never outlasts the stream for long).
    ended = threading.Event()
    sender = Sender(seq, channel, conn.send_bytes, ended.set)
    producer = threading.Thread(target=pump, args=(gen, channel), name=f"serve-stream-{seq}-producer", daemon=True)
    producer.start()
    sender.start(len(first))
    alive = True
    while alive and not ended.is_set():
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):  # the parent is gone: stop the generator, then end
            sender.close()
            alive = False
            continue
        if isinstance(message, Credit) and message.seq == seq:
            sender.grant(message.count)
        elif isinstance(message, CloseStream) and message.seq == seq:
            sender.close()
        elif not isinstance(message, (Credit, CloseStream)):  # a late one for an ended stream is dropped
            kept.append(message)
    producer.join()
    return alive


# ----------------------------------------------------------------- an async worker
class Sender:
    """Moves one stream's items from the worker's local channel to the pipe, within the credit window.

    Args:
        seq: the call's number.
        channel: where the worker's loop pumps the generator.
        send: sends one message's bytes to the parent (thread-safe).
        done: called once the generator is closed, just before its end is sent.
    """

    def __init__(self, seq: int, channel: Channel, send: Callable[[bytes], None], done: Callable[[], object]) -> None:
        self._seq = seq
        self._channel = channel
        self._send = send
        self._done = done
        self._credits = STREAM_WINDOW
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"serve-stream-{seq}", daemon=True)

    def start(self, sent: int) -> None:
        self._credits -= sent
        self._thread.start()

    def grant(self, count: int) -> None:
        with self._changed:
            self._credits += count
            self._changed.notify()

    def close(self) -> None:
        """The reader closed the stream: the generator is closed (cancelled inside, if it awaits)."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._channel.close()

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            while items := self._channel.read():
                while items and self._room():
                    part, items = items[: self._credits], items[self._credits :]
                    with self._changed:
                        self._credits -= len(part)
                    self._send(_items(self._seq, part))
        except BaseException as exc:  # noqa: BLE001 - the generator's failure
            error = exc
        self._channel.close()
        self._channel.ended.result()  # the generator is closed: its finally ran
        self._done()
        self._send(dumps(StreamEnd(self._seq, remote_error(error) if error is not None else None)))

    def _room(self) -> bool:
        """Wait for a credit; False once the reader closed the stream."""
        with self._changed:
            while self._credits <= 0 and not self._closed:
                self._changed.wait()
            return not self._closed


# --------------------------------------------------------------------- the parent
class ParentStreams:
    """A process replica's streams, by call number: channels its reader thread feeds.

    Args:
        send: sends a message to the worker (credits, closes); ignores a pipe that is gone.
    """

    def __init__(self, send: Send) -> None:
        self._send = send
        self._lock = threading.Lock()
        self._open: dict[int, Channel] = {}

    def open(self, seq: int, message: StreamOpened) -> Channel:
        """The channel of call ``seq``'s stream, holding its first item(s)."""
        channel = Channel(STREAM_WINDOW)
        channel.put_nowait(*message.first)
        if message.ended:
            channel.finish()
            return channel
        with self._lock:
            self._open[seq] = channel
        taken = [0]

        def took(count: int) -> None:
            taken[0] += count
            if taken[0] >= STREAM_WINDOW // 2:
                granted, taken[0] = taken[0], 0
                self._send(Credit(seq, granted))

        channel.on_take = took
        channel.on_close(lambda: self._send(CloseStream(seq)))
        return channel

    def deliver(self, message: StreamItems | StreamEnd) -> None:
        """An item message or the end of a stream, from the worker."""
        with self._lock:
            channel = self._open.get(message.seq)
            if isinstance(message, StreamEnd):
                self._open.pop(message.seq, None)
        if channel is None:
            return  # cannot happen with our worker
        if isinstance(message, StreamItems):
            channel.put_nowait(*message.items)
        else:
            channel.finish(message.error)

    def fail_all(self, error: BaseException) -> None:
        """The worker died: every open stream ends with ``error``."""
        with self._lock:
            channels, self._open = list(self._open.values()), {}
        for channel in channels:
            channel.finish(died=error)

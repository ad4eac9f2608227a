"""Streams: the items of a generator backend on their way from its replica to the caller.

A backend whose call returns a generator or an async generator *streams*. Its replica
answers the query as soon as the first item exists, with an :class:`ItemStream` (the
reader's end), and keeps producing into it while the reader reads; the replica's slot
stays taken (``max_concurrent_queries`` counts a running stream) until the producer ends,
which :attr:`ItemStream.ended` tells the backend's runtime.

* :class:`Channel` is the in-process stream: a bounded buffer between a producer (a
  replica's thread or event loop, or the thread receiving a worker's or an actor's items)
  and a reader on any thread or loop. A full buffer makes the producer wait (back-pressure);
  a reader that closes makes the producer's next ``put`` return False, and its
  :meth:`Channel.on_close` callbacks run (an async pump cancels its task there).
* :class:`ServeStream` is what ``handle.options(stream=True).remote()`` returns: an
  iterator and an async iterator of the items; closing it (or dropping it) closes the stream.

A stream ends once: normally (the generator was exhausted), with the error it raised
mid-stream (the reader gets it raised once, then the end), or closed by its reader.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

STREAM_BUFFER = 64
"""Items a stream buffers between its producer and its reader before the producer waits."""


class ItemStream:
    """The reader's end of a stream (the value a streaming query is answered with).

    ``ended`` resolves once the producer is done (its generator finalised, its ``finally``
    run): with ``None``, or with :class:`~serve_core.errors.ReplicaDiedError` when the replica
    died under it. ``items`` counts the items produced, ``error`` is the mid-stream failure.
    """

    ended: Future[None]
    items: int = 0
    error: BaseException | None = None

    def read(self, timeout: float | None = None) -> list[Any]:
        """The items available now, waiting for at least one; ``[]`` once the stream is over.

        Raises:
            TimeoutError: nothing came within ``timeout`` seconds.
            BaseException: what the generator raised mid-stream (once; then the stream is over).
        """
        raise NotImplementedError

    async def aread(self) -> list[Any]:
        """:meth:`read` for a reader on an event loop (waits without blocking it)."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop reading: the producer stops at its next item and its generator is closed. Idempotent."""
        raise NotImplementedError

    def abort(self, error: BaseException) -> None:
        """End the stream for its reader with ``error`` (shutdown, a replaced replica) and stop the producer."""
        raise NotImplementedError


class Channel(ItemStream):
    """A bounded in-process stream; ``put``/``aput``/``finish`` are the producer's, the rest the reader's.

    Args:
        capacity: items buffered before the producer waits.
    """

    def __init__(self, capacity: int = STREAM_BUFFER) -> None:
        self.ended = Future()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._items: collections.deque[Any] = collections.deque()
        self._capacity = capacity
        self._over = False  # nothing more will come: the producer finished, or the stream was aborted
        self._closed = False  # the reader stopped (or the stream was aborted): the producer must stop
        self._failure: BaseException | None = None  # raised once to the reader
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._on_close: list[Callable[[], None]] = []
        self.on_take: Callable[[int], None] | None = None  # told how many items each read took (credits)

    # --------------------------------------------------------------- producer
    def put(self, item: Any) -> bool:
        """Add an item, waiting while the buffer is full; False when the reader closed (stop producing)."""
        with self._lock:
            while len(self._items) >= self._capacity and not self._closed:
                self._changed.wait()
            if self._closed:
                return False
            self._append(item)
        return True

    def put_nowait(self, *items: Any) -> None:
        """Add items whatever the buffer holds (the first one, or what a credit window already bounds)."""
        with self._lock:
            if not self._closed:
                for item in items:
                    self._append(item)

    async def aput(self, item: Any) -> bool:
        """:meth:`put` for a producer on an event loop."""
        while True:
            with self._lock:
                if self._closed:
                    return False
                if len(self._items) < self._capacity:
                    self._append(item)
                    return True
                waiter = self._waiter()
            await waiter

    def finish(self, error: BaseException | None = None, *, died: BaseException | None = None) -> None:
        """The producer is done: exhausted (``error=None``), failed with ``error``, or its replica ``died``."""
        with self._lock:
            if not self._over:
                self._over = True
                self._failure = died if died is not None else error
            if self.error is None:
                self.error = died if died is not None else error
            self._wake()
        if not self.ended.done():
            if died is not None:
                self.ended.set_exception(died)
            else:
                self.ended.set_result(None)

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (once, on the closing thread) when the reader closes or the stream is aborted."""
        with self._lock:
            if not self._closed:
                self._on_close.append(callback)
                return
        callback()

    @property
    def closed(self) -> bool:
        """Whether the reader closed the stream (the producer should stop)."""
        return self._closed

    # ----------------------------------------------------------------- reader
    def read(self, timeout: float | None = None) -> list[Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not (self._items or self._over or self._closed):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"no stream item within {timeout} s")
                self._changed.wait(left)
            taken = self._take()
        if taken and self.on_take is not None:
            self.on_take(len(taken))
        return taken

    async def aread(self) -> list[Any]:
        while True:
            with self._lock:
                ready = bool(self._items) or self._over or self._closed
                if ready:
                    taken = self._take()
                else:
                    waiter = self._waiter()
            if ready:
                if taken and self.on_take is not None:
                    self.on_take(len(taken))
                return taken
            await waiter

    def close(self) -> None:
        self._shut(None)

    def abort(self, error: BaseException) -> None:
        self._shut(error)

    # ---------------------------------------------------------------- private
    def _shut(self, error: BaseException | None) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._items.clear()
            if error is not None and not self._over:
                self._over, self._failure = True, error
            callbacks, self._on_close = self._on_close, []
            self._wake()
        for callback in callbacks:
            callback()

    def _append(self, item: Any) -> None:
        """Buffer an item and wake the reader (under the lock)."""
        self._items.append(item)
        self.items += 1
        if len(self._items) == 1:  # the reader waits only on an empty buffer
            self._wake()

    def _take(self) -> list[Any]:
        """What the reader gets now (under the lock; something is there, or the stream is over)."""
        if self._items:
            full = len(self._items) >= self._capacity
            taken = list(self._items)
            self._items.clear()
            if full:  # the producer waits only on a full buffer
                self._wake()
            return taken
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure
        return []

    def _waiter(self) -> asyncio.Future[None]:
        """A future of the running loop, resolved at the next change (under the lock)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append((loop, waiter))
        return waiter

    def _wake(self) -> None:
        """Wake both sides' waiters: threads and loops (under the lock)."""
        self._changed.notify_all()
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for loop, waiter in waiters:
                try:
                    loop.call_soon_threadsafe(_resolve, waiter)
                except RuntimeError:
                    pass  # that loop is closed: its waiter is gone with it


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class ServeStream:
    """The items of a streaming call: what ``handle.options(stream=True).remote()`` returns.

    Iterate it (``for item in stream``) or iterate it asynchronously (``async for``); each
    waits for the next item. The call's error (before the first item) and a mid-stream
    error are raised where the iteration is. A backend that does not stream gives its result
    as the one item. :meth:`close` (or :meth:`aclose`, leaving a ``with`` block, breaking out
    of the loop and dropping the object) stops the generator in its replica.

    Args:
        future: the call's future, answered with an :class:`ItemStream` (or a plain result).
    """

    def __init__(self, future: Any) -> None:
        self.future = future
        self._stream: ItemStream | None = None
        self._buffer: collections.deque[Any] = collections.deque()
        self._done = False

    def __iter__(self) -> ServeStream:
        return self

    def __next__(self) -> Any:
        while not self._buffer:
            if self._done:
                raise StopIteration
            stream = self._stream
            if stream is None:
                self._opened(self.future.result())
                continue
            self._take(stream.read())
        return self._buffer.popleft()

    def __aiter__(self) -> ServeStream:
        return self

    async def __anext__(self) -> Any:
        while not self._buffer:
            if self._done:
                raise StopAsyncIteration
            stream = self._stream
            if stream is None:
                self._opened(await asyncio.wrap_future(self.future))
                continue
            self._take(await stream.aread())
        return self._buffer.popleft()

    def close(self) -> None:
        """Stop the stream (its generator's ``finally`` runs in the replica). Idempotent."""
        self._done = True
        self._buffer.clear()
        if self._stream is not None:
            self._stream.close()
        elif not self.future.cancel():  # queued: withdrawn; else closed as soon as it is answered
            self.future.add_done_callback(_close_result)

    async def aclose(self) -> None:
        """:meth:`close`, for ``async with`` and async generators' conventions."""
        self.close()

    def __enter__(self) -> ServeStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._done:
            self.close()

    def _opened(self, result: Any) -> None:
        if isinstance(result, ItemStream):
            self._stream = result
        else:  # a backend that does not stream: its result is the one item
            self._buffer.append(result)
            self._done = True

    def _take(self, items: list[Any]) -> None:
        if items:
            self._buffer.extend(items)
        else:  # over: nothing more to read
            self._done = True

    def __repr__(self) -> str:
        state = "done" if self._done else "open" if self._stream is not None else "waiting"
        return f"<ServeStream {state}>"


def _close_result(future: Future[Any]) -> None:
    if not future.cancelled() and future.exception() is None and isinstance(future.result(), ItemStream):
        future.result().close()

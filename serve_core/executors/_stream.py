"""Streaming inside a replica: running a generator a call returned into its stream.

A call whose outcome is a :class:`~serve_core.invoke.Generated` streams. The replica runs the
generator to its first item (:func:`open_stream`), answers the call with a
:class:`~serve_core.streams.Channel` holding it (or with the error raised before any item,
an ordinary failed outcome), then pumps the rest into the channel (:func:`pump` on the
replica's thread, :func:`apump` on its event loop) until the generator ends, fails, or the
reader closes the stream; then it closes the generator, so its ``finally`` runs there.

The inline executor has no thread of its own: its :class:`PullStream` runs each step of
the generator in the reader's thread (or task) when the reader asks for the next item.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Any

from ..invoke import END, Generated, cancelled_error
from ..streams import Channel, ItemStream
from .base import Outcome


def generated_of(outcomes: list[Outcome]) -> Generated | None:
    """The generator a single call's outcomes carry, if it streams."""
    if len(outcomes) == 1 and type(outcomes[0].value) is Generated:
        return outcomes[0].value
    return None


def open_stream(gen: Generated) -> tuple[Outcome, Channel | None]:
    """Run ``gen`` to its first item: the call's outcome, and the channel to pump into (None: nothing to pump)."""
    try:
        first = gen.next()
    except BaseException as exc:  # noqa: BLE001 - the call's answer, as any user error
        return Outcome(False, exc), None
    channel = Channel()
    if first is END:
        try:
            gen.close()
        except BaseException as exc:  # noqa: BLE001 - its finally failed: the stream's error
            channel.finish(exc)
        else:
            channel.finish()
        return Outcome(True, channel), None
    channel.put_nowait(first)
    return Outcome(True, channel), channel


async def aopen_stream(gen: Generated) -> tuple[Outcome, Channel | None]:
    """:func:`open_stream` on the running loop."""
    try:
        first = await gen.anext()
    except BaseException as exc:  # noqa: BLE001 - see open_stream
        return Outcome(False, exc), None
    channel = Channel()
    if first is END:
        await _aclosed(gen, channel)
        return Outcome(True, channel), None
    channel.put_nowait(first)
    return Outcome(True, channel), channel


def pump(gen: Generated, channel: Channel) -> None:
    """Move the generator's items into ``channel`` (waiting while it is full) until one side ends."""
    error: BaseException | None = None
    try:
        while (item := gen.next()) is not END and channel.put(item):
            pass
    except BaseException as exc:  # noqa: BLE001 - a mid-stream failure ends the stream with it
        error = exc
    try:
        gen.close()
    except BaseException as exc:  # noqa: BLE001 - its finally failed
        error = error or exc
    channel.finish(error)


async def apump(gen: Generated, channel: Channel) -> None:
    """:func:`pump` on the running loop; a reader that closes cancels a wait inside the generator."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    inside = [False]  # awaiting the generator: a close may cancel the task there, not elsewhere

    def cancel_inside() -> None:
        if inside[0] and task is not None:
            task.cancel()

    channel.on_close(lambda: _call_soon(loop, cancel_inside))
    error: BaseException | None = None
    try:
        while True:
            inside[0] = True
            try:
                item = await gen.anext()
            finally:
                inside[0] = False
            if item is END or not await channel.aput(item):
                break
    except asyncio.CancelledError:
        if not channel.closed:
            error = cancelled_error()
    except BaseException as exc:  # noqa: BLE001 - see pump
        error = exc
    await _aclosed(gen, channel, error)


async def _aclosed(gen: Generated, channel: Channel, error: BaseException | None = None) -> None:
    try:
        await gen.aclose()
    except BaseException as exc:  # noqa: BLE001 - its finally failed
        error = error or exc
    channel.finish(error)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:
        pass  # the loop has ended: so has the pump


class PullStream(ItemStream):
    """An inline replica's stream: each read runs the generator's next step in the reader's thread or task.

    Args:
        gen: the generator, already run to its first item.
        first: that item.
    """

    def __init__(self, gen: Generated, first: Any) -> None:
        self.ended: Future[None] = Future()
        self._gen: Generated | None = gen
        self._first = [first]
        self.items = 1

    @classmethod
    def opened(cls, gen: Generated) -> Outcome:
        """Run ``gen`` to its first item: the call's outcome (this stream, or the error)."""
        try:
            first = gen.next()
        except BaseException as exc:  # noqa: BLE001 - see open_stream
            return Outcome(False, exc)
        return cls._outcome(gen, first)

    @classmethod
    async def aopened(cls, gen: Generated) -> Outcome:
        """:meth:`opened` on the running loop."""
        try:
            first = await gen.anext()
        except BaseException as exc:  # noqa: BLE001 - see open_stream
            return Outcome(False, exc)
        return cls._outcome(gen, first)

    @classmethod
    def _outcome(cls, gen: Generated, first: Any) -> Outcome:
        stream = cls(gen, first)
        if first is END:
            stream.items = 0
            stream._first = []
            stream._end(None)
        return Outcome(True, stream)

    def read(self, timeout: float | None = None) -> list[Any]:
        if self._first:
            first, self._first = self._first, []
            return first
        gen = self._gen
        if gen is None:
            return []
        try:
            item = gen.next()
        except BaseException as exc:
            self._end(exc)
            raise
        return self._step(item)

    async def aread(self) -> list[Any]:
        if self._first:
            first, self._first = self._first, []
            return first
        gen = self._gen
        if gen is None:
            return []
        try:
            item = await gen.anext()
        except BaseException as exc:
            self._end(exc)
            raise
        return self._step(item)

    def close(self) -> None:
        self._first = []
        self._end(None)

    def abort(self, error: BaseException) -> None:
        self._first = []
        self._end(error)

    def _step(self, item: Any) -> list[Any]:
        if item is END:
            self._end(None)
            return []
        self.items += 1
        return [item]

    def _end(self, error: BaseException | None) -> None:
        gen, self._gen = self._gen, None
        if gen is None:
            return
        try:
            gen.close()
        except BaseException as exc:  # noqa: BLE001 - its finally failed
            error = error or exc
        self.error = error
        self.ended.set_result(None)

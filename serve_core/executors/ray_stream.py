"""The parent's side of a Ray replica's stream: a thread pulling the items from the actor.

The actor answers a call that streams with its first item (:meth:`.ray_actor.ReplicaActor._open_stream`)
and keeps the generator. :func:`pull_stream` gives the reader a :class:`~serve_core.streams.Channel`
and starts a thread that asks the actor for the next items (``stream_next``, at most
:data:`PULL_ITEMS` at a time) only once the previous ones are in the channel: a
reader that does not read holds the generator back. A reader that closes the stream makes the
thread ask the actor to close the generator (``stream_close``: its ``finally`` runs in the
actor) before the stream ends; an actor that dies ends the stream with
:class:`~serve_core.errors.ReplicaDiedError`.
"""

from __future__ import annotations

import logging
import pickle
import threading
from typing import Any

from ray import exceptions as ray_errors

from ..errors import ReplicaDiedError
from ..streams import Channel
from ._wire import StreamOpened

log = logging.getLogger("serve_core")

PULL_ITEMS = 256
"""Items one ``stream_next`` may bring (a round trip to the actor costs about a millisecond); the
reader's channel holds as many, so at most two such batches are out at once."""


def pull_stream(actor: Any, opened: StreamOpened, replica_id: str) -> Channel:
    """The reader's channel of a stream the actor opened; its items are pulled on a thread of their own."""
    channel = Channel(PULL_ITEMS)
    channel.put_nowait(*opened.first)
    if opened.ended:
        channel.finish()
        return channel
    thread = threading.Thread(
        target=_pull, args=(actor, opened.seq, channel, replica_id), name=f"serve-stream-{replica_id}", daemon=True
    )
    thread.start()
    return channel


def _pull(actor: Any, seq: int, channel: Channel, replica_id: str) -> None:
    from .ray_replica import _wait_for

    try:
        while True:
            items, ended, error = pickle.loads(_wait_for(actor.stream_next.remote(seq, PULL_ITEMS)))
            if not all(channel.put(item) for item in items):
                break  # the reader closed the stream
            if ended:
                channel.finish(error)
                return
            if channel.closed:
                break
        _wait_for(actor.stream_close.remote(seq))
        channel.finish()
    except (ray_errors.RayError, ReplicaDiedError) as exc:
        died = ReplicaDiedError(f"replica {replica_id} (Ray actor) died while it streamed: {exc}")
        died.__cause__ = exc
        channel.finish(died=died)
    except BaseException as exc:  # noqa: BLE001 - never leave a stream open
        log.exception("replica %s: pulling a stream failed", replica_id)
        channel.finish(exc)

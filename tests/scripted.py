"""A thread-free executor whose replicas hold every call until the test answers it.

Calls run (through the real :class:`~serve_core.invoke.Invoker`) only when the test says
so, in the test's thread; a replica can crash (failing its held calls), and starting a
replica can be made to fail. With a :class:`~serve_core.testing.FakeClock` that makes
the scheduler's interleavings fully test-driven.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

from serve_core.errors import NotDeliveredError, ReplicaDiedError
from serve_core.executors._stream import generated_of, open_stream
from serve_core.executors.base import Call, Outcome, ReplicaSpec
from serve_core.invoke import END, Generated, Invoker
from serve_core.streams import Channel

from .conftest import WAIT


class ScriptedReplica:
    default_max_concurrent_queries = 1

    def __init__(self, spec: ReplicaSpec) -> None:
        self.replica_id = spec.replica_id
        self.held: list[tuple[Call, Future[list[Outcome]]]] = []
        self.producers: list[tuple[Generated, Channel]] = []  # streams answered, produced step by step
        self.alive = True
        self._invoker = Invoker(spec.target, spec.init_args)

    def submit(self, call: Call) -> Future[list[Outcome]]:
        future: Future[list[Outcome]] = Future()
        if not self.alive:
            future.set_exception(NotDeliveredError(f"replica {self.replica_id} was stopped"))
        else:
            future.set_running_or_notify_cancel()
            self.held.append((call, future))
        return future

    def complete(self, index: int = 0) -> None:
        """Run the ``index``-th held call and answer it."""
        call, future = self.held.pop(index)
        outcomes = self._invoker.run(call)
        gen = generated_of(outcomes)
        if gen is not None:  # a stream: answered at its first item, the rest comes with produce()
            outcome, channel = open_stream(gen)
            if channel is not None:
                self.producers.append((gen, channel))
            outcomes = [outcome]
        future.set_result(outcomes)

    def produce(self, index: int = 0) -> None:
        """One step of the ``index``-th stream's generator (it ends if its reader closed it)."""
        gen, channel = self.producers[index]
        try:
            item = END if channel.closed else gen.next()
        except BaseException as exc:  # noqa: BLE001 - a mid-stream failure ends the stream
            self.producers.pop(index)
            channel.finish(exc)
            return
        if item is END:
            self.producers.pop(index)
            gen.close()
            channel.finish()
        else:
            channel.put_nowait(item)

    def crash(self) -> None:
        """Die: every held call fails with ``ReplicaDiedError``."""
        self.alive = False
        held, self.held = self.held, []
        for _, future in held:
            future.set_exception(ReplicaDiedError(f"replica {self.replica_id} crashed"))
        producers, self.producers = self.producers, []
        for _, channel in producers:
            channel.finish(died=ReplicaDiedError(f"replica {self.replica_id} crashed mid-stream"))

    def stop(self, drain_timeout: float | None = None) -> None:
        self.alive = False


class ScriptedExecutor:
    """Starts :class:`ScriptedReplica` objects; ``failing_starts`` makes the next starts raise."""

    name = "scripted"
    places_replicas = False

    def __init__(self) -> None:
        self.started: list[ScriptedReplica] = []
        self.failing_starts = 0
        self.start_gate: threading.Event | None = None  # when set, starts wait for it

    def start_replica(self, spec: ReplicaSpec) -> ScriptedReplica:
        if self.start_gate is not None and not self.start_gate.wait(WAIT):
            raise RuntimeError("start_gate was never opened (scripted)")
        if self.failing_starts:
            self.failing_starts -= 1
            raise RuntimeError(f"cannot start a replica of {spec.backend_tag} (scripted)")
        replica = ScriptedReplica(spec)
        self.started.append(replica)
        return replica

    def live(self) -> list[ScriptedReplica]:
        return [replica for replica in self.started if replica.alive]

    def held(self) -> list[ScriptedReplica]:
        return [replica for replica in self.started if replica.held]

    def shutdown(self) -> None:
        pass

"""Every call resolves exactly once: a randomized interleaving of everything that can happen to a query.

A Hypothesis state machine drives one ``Serve`` on a fake clock: calls (with and without
deadlines, to a split endpoint, a batched backend and an endpoint without traffic yet),
completions, user errors, replica crashes, failing replacements, scale up and down,
link and split, time passing (deadlines, batch waits, the waiting room's timeout),
cancellation by the caller (of queued calls, and of running ones, which the replicas here
cancel the way an async replica cancels a task: at once, or when the call next ends),
calls whose caller runs them in its own thread (caller-runs: answered, the replica crashing
there, or found stopped),
replacing a backend's code under its tag (the old runtime drains while the new one takes
the calls), composed calls (made "inside a replica": with a deadline and a chain, which may be
refused as a loop back; and the ones a process worker sends, through the parent's
:class:`~serve_core.executors._nested.NestedCalls`, cancelled by the worker or abandoned when it
dies: each gets exactly one answer sent back), and shutdown. After every step no future has been resolved
twice, nothing was logged as a failure of the scheduler and no thread died of an
exception; after ``shutdown()`` no future is pending.

The backends run on the thread-free :class:`~tests.scripted.ScriptedExecutor` (calls wait
until a step answers them; here with a ``cancel``) and on the inline executor (calls
complete inside submit).
"""

from __future__ import annotations

import functools
import logging
import math
import pickle
import random
import threading
from collections.abc import Iterator
from concurrent.futures import CancelledError, Future
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import serve_core as serve
from serve_core import BackendConfig, Serve
from serve_core.composition import Origin, ReplicaScope
from serve_core.errors import NotDeliveredError, ReplicaDiedError, ServeError
from serve_core.executors._nested import NESTED, Nested, NestedCalls, NestedCancel
from serve_core.executors.base import Call, Outcome, ReplicaSpec
from serve_core.slo import SLO
from serve_core.streams import ItemStream, ServeStream
from serve_core.testing import FakeClock

from .conftest import WAIT
from .procs import wait_until
from .scripted import ScriptedExecutor, ScriptedReplica


def answer(*, i: int = 0, fail: bool = False) -> int:
    if fail:
        raise ValueError(f"user error {i}")
    return i


def answer_edited(*, i: int = 0, fail: bool = False) -> int:
    """Another definition of ``answer`` (other code): replacing one with the other swaps runtimes."""
    return answer(i=i, fail=fail) + 0


def numbers(*, n: int = 2, fail: bool = False) -> Iterator[int]:
    """A streaming backend: ``n`` items, then maybe an error mid-stream."""
    yield from range(n)
    if fail:
        raise ValueError("user error mid-stream")


@serve.accept_batch
def batched(requests: Any, *, i: list[int], fail: list[bool]) -> list[int]:
    if any(fail):
        raise ValueError("user error in a batch")
    return i


class _Failures(logging.Handler):
    """Records what the scheduler logged as broken (a replacement that could not start is expected)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not record.getMessage().startswith("could not replace dead replica"):
            self.records.append(record)


class CancellableReplica(ScriptedReplica):
    """A scripted replica whose held calls can be cancelled (``CancellableReplica`` of executors.base).

    ``at_once``: the cancelled call ends inside ``cancel`` (its task saw the cancellation at
    once); otherwise it ends with ``CancelledError`` when the test next completes it.
    """

    def __init__(self, spec: ReplicaSpec) -> None:
        super().__init__(spec)
        self.at_once = False
        self.cancelled: list[Future[list[Outcome]]] = []
        self.here = "answer"  # what run_here does: answer, crash (dies), stopped (never ran the call)

    def run_here(self, call: Call) -> list[Outcome]:
        """Caller-runs (``CallerRunsReplica``): the call runs in the caller's thread, or the replica fails."""
        assert not self.held, "a caller ran a call on a replica holding another one"
        if self.here == "answer":
            return self._invoker.run(call)
        self.alive = False
        if self.here == "crash":
            raise ReplicaDiedError(f"replica {self.replica_id} crashed in the caller's thread")
        raise NotDeliveredError(f"replica {self.replica_id} was stopped")

    def cancel(self, future: Future[list[Outcome]]) -> bool:
        index = next((i for i, (_, held) in enumerate(self.held) if held is future), None)
        if index is None:
            return False
        if self.at_once:
            call, _ = self.held.pop(index)
            future.set_result([Outcome(False, CancelledError())] * len(call))
        elif not any(f is future for f in self.cancelled):
            self.cancelled.append(future)
        return True

    def complete(self, index: int = 0) -> None:
        call, future = self.held[index]
        if not any(f is future for f in self.cancelled):
            super().complete(index)
            return
        self.held.pop(index)
        self.cancelled = [f for f in self.cancelled if f is not future]
        future.set_result([Outcome(False, CancelledError())] * len(call))


class CancellableExecutor(ScriptedExecutor):
    def start_replica(self, spec: ReplicaSpec) -> ScriptedReplica:
        if self.start_gate is not None and not self.start_gate.wait(WAIT):
            raise RuntimeError("start_gate was never opened (scripted)")
        if self.failing_starts:
            self.failing_starts -= 1
            raise RuntimeError(f"cannot start a replica of {spec.backend_tag} (scripted)")
        replica = CancellableReplica(spec)
        self.started.append(replica)
        return replica


def _wait_for_replacements() -> None:
    """Replacements and retirements run on helper threads: wait until they are over, so every run is the same."""
    helpers = ("serve-replace-", "serve-retire")
    wait_until(lambda: not any(t.name.startswith(helpers) for t in threading.enumerate()), WAIT)


class Scheduler(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.executor = CancellableExecutor()
        self.failures = _Failures()
        for name in ("serve_core", "concurrent.futures"):
            logging.getLogger(name).addHandler(self.failures)
        self.thread_errors: list[BaseException | None] = []
        self._excepthook = threading.excepthook
        threading.excepthook = lambda args: self.thread_errors.append(args.exc_value)  # helper threads too
        self.srv = Serve(
            executor=self.executor,
            clock=self.clock,
            rng=random.Random(0),  # the split's draws: the same in every run
            start_server=False,
            drain_timeout_s=0.05,  # scale-down and shutdown waits (real seconds bound them too)
            pending_timeout_s=2.0,
            max_pending_per_endpoint=4,
        )
        self.srv.create_endpoint("split")
        self.srv.create_endpoint("batch")
        self.srv.create_endpoint("later")
        self.srv.create_backend(answer, "s", backend_config=BackendConfig(max_queue_size=6, drop_expired=True))
        self.srv.create_backend(answer, "i", backend_config=BackendConfig(executor="inline"))
        self.srv.create_backend(
            batched, "bt",
            backend_config=BackendConfig(max_batch_size=3, batch_wait_timeout_s=0.1, drop_expired=True),
        )
        self.srv.split("split", {"s": 0.5, "i": 0.5})
        self.srv.link("batch", "bt")
        self.srv.create_endpoint("stream")
        self.srv.create_backend(numbers, "st", backend_config=BackendConfig(max_queue_size=6, max_concurrent_queries=2))
        self.srv.link("stream", "st")
        self.readers: list[ServeStream] = []
        self.futures: list[Future[Any]] = []
        self.resolutions: dict[int, int] = {}
        self.stopped = False
        self.replicas = {"s": 1, "bt": 1}
        self.calls = 0
        # A process replica's side of the composed calls its worker makes; answers counted by number.
        self.nested = NestedCalls(ReplicaScope(self.srv, "s"), self._nested_answer)
        self.nested_sent: list[int] = []
        self.nested_answers: dict[int, int] = {}

    # --------------------------------------------------------------- calls
    @precondition(lambda self: not self.stopped)
    @rule(
        endpoint=st.sampled_from(["split", "batch", "later"]),
        slo=st.sampled_from([None, 20, 150, 1000]),
        fail=st.booleans(),
    )
    def call(self, endpoint: str, slo: int | None, fail: bool) -> None:
        self.calls += 1
        handle = self.srv.get_handle(endpoint, missing_ok=True, relative_slo_ms=slo)
        try:
            future = handle.remote(i=self.calls, fail=fail)
        except ServeError:
            return  # refused at once (back pressure, broken backend): the caller got its answer
        index = len(self.futures)
        self.resolutions[index] = 0
        future.add_done_callback(functools.partial(self._resolved, index))
        self.futures.append(future)

    @precondition(lambda self: not self.stopped)
    @rule(
        endpoint=st.sampled_from(["split", "later"]),
        fail=st.booleans(),
        here=st.sampled_from(["answer", "answer", "crash", "stopped"]),
        replacement_fails=st.booleans(),
        timeout=st.sampled_from([None, 1.0]),
    )
    def call_here(self, endpoint: str, fail: bool, here: str, replacement_fails: bool, timeout: float | None) -> None:
        """A caller that blocks on the answer (the WSGI front): it may run the call in its own thread."""
        self.calls += 1
        for replica in self.executor.started:
            assert isinstance(replica, CancellableReplica)
            replica.here = here
        self.executor.failing_starts = int(replacement_fails)
        # A replica that failed here is replaced on a helper thread: held at the gate until this
        # thread is done with the call, so the two never race (and every run is the same).
        self.executor.start_gate = threading.Event()
        try:
            future = self.srv.enqueue(
                endpoint, kwargs={"i": self.calls, "fail": fail}, caller_runs=True, caller_timeout_s=timeout
            )
        except ServeError:
            return
        finally:
            for replica in self.executor.started:
                assert isinstance(replica, CancellableReplica)
                replica.here = "answer"
            self.executor.start_gate.set()
            _wait_for_replacements()
            self.executor.start_gate = None
            self.executor.failing_starts = 0
        index = len(self.futures)
        self.resolutions[index] = 0
        future.add_done_callback(functools.partial(self._resolved, index))
        self.futures.append(future)

    def _resolved(self, index: int, future: Future[Any]) -> None:
        self.resolutions[index] += 1

    @precondition(lambda self: not self.stopped)
    @rule(
        endpoint=st.sampled_from(["split", "later"]),
        slo=st.sampled_from([None, 20, 1000]),
        chain=st.sampled_from([(), ("s",), ("i", "s"), ("s", "s", "s")]),
    )
    def composed_call(self, endpoint: str, slo: int | None, chain: tuple[str, ...]) -> None:
        """A call made inside a replica: the caller's deadline and chain come along (a loop back is refused)."""
        self.calls += 1
        deadline = math.inf if slo is None else self.clock.monotonic() + slo / 1000
        try:
            future = self.srv.enqueue(endpoint, kwargs={"i": self.calls}, origin=Origin(deadline, chain))
        except ServeError:
            return  # refused at once: loop back, back pressure
        index = len(self.futures)
        self.resolutions[index] = 0
        future.add_done_callback(functools.partial(self._resolved, index))
        self.futures.append(future)

    @precondition(lambda self: not self.stopped)
    @rule(n=st.integers(0, 3), fail=st.booleans(), streaming=st.booleans())
    def stream_call(self, n: int, fail: bool, streaming: bool) -> None:
        """A call to a generator backend, read as a stream (or not: it must fail, once)."""
        handle = self.srv.get_handle("stream").options(stream=streaming)
        try:
            answer = handle.remote(n=n, fail=fail)
        except ServeError:
            return
        future = answer.future if isinstance(answer, ServeStream) else answer
        if isinstance(answer, ServeStream):
            self.readers.append(answer)
        index = len(self.futures)
        self.resolutions[index] = 0
        future.add_done_callback(functools.partial(self._resolved, index))
        self.futures.append(future)

    @precondition(lambda self: not self.stopped)
    @rule(chain=st.sampled_from([(), ("s",), ("s", "s", "s")]), slo=st.sampled_from([None, 20]))
    def worker_call(self, chain: tuple[str, ...], slo: int | None) -> None:
        """A worker's composed call reaches the parent (answered once, whatever happens to it)."""
        number = len(self.nested_sent)
        self.nested_sent.append(number)
        self.nested_answers[number] = 0
        message = Nested(number, "split", "__call__", {"i": number}, SLO.parse(slo), None, Origin(chain=chain))
        self.nested.receive(memoryview(pickle.dumps(message)))

    @precondition(lambda self: self.nested_sent)
    @rule(data=st.data())
    def worker_cancels(self, data: st.DataObject) -> None:
        self.nested.receive(memoryview(pickle.dumps(NestedCancel(data.draw(st.sampled_from(self.nested_sent))))))

    @precondition(lambda self: not self.stopped)
    @rule()
    def worker_cancel_overtakes_its_call(self) -> None:
        """Through Ray's gateway a cancel may come before its call: the call is answered cancelled, at once."""
        number = len(self.nested_sent)
        self.nested_sent.append(number)
        self.nested_answers[number] = 0
        self.nested.receive(memoryview(pickle.dumps(NestedCancel(number))))
        assert self.nested_answers[number] == 0
        message = Nested(number, "split", "__call__", {"i": number}, SLO.parse(None), None, Origin(chain=()))
        self.nested.receive(memoryview(pickle.dumps(message)))
        assert self.nested_answers[number] == 1  # not queued: withdrawn before it came

    @precondition(lambda self: self.nested_sent)
    @rule()
    def worker_dies(self) -> None:
        self.nested.cancel_all()

    def _nested_answer(self, data: bytes) -> bool:
        assert data.startswith(NESTED)
        number = int.from_bytes(data[len(NESTED):len(NESTED) + 8], "little")
        self.nested_answers[number] += 1
        return True
    @precondition(lambda self: any(replica.producers for replica in self.executor.started))
    @rule(data=st.data())
    def produce(self, data: st.DataObject) -> None:
        replica = data.draw(st.sampled_from([r for r in self.executor.started if r.producers]))
        replica.produce(data.draw(st.integers(0, len(replica.producers) - 1)))

    @precondition(lambda self: self.readers)
    @rule(data=st.data())
    def close_reader(self, data: st.DataObject) -> None:
        data.draw(st.sampled_from(self.readers)).close()

    @precondition(lambda self: self.futures)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        data.draw(st.sampled_from(self.futures)).cancel()

    @precondition(lambda self: any(future.running() for future in self.futures))
    @rule(data=st.data(), at_once=st.booleans())
    def cancel_running(self, data: st.DataObject, at_once: bool) -> None:
        future = data.draw(st.sampled_from([future for future in self.futures if future.running()]))
        for replica in self.executor.started:
            assert isinstance(replica, CancellableReplica)
            replica.at_once = at_once
        taken = future.cancel()
        for replica in self.executor.started:
            assert isinstance(replica, CancellableReplica)
            replica.at_once = False
        if taken and at_once:  # the call ended inside cancel(): its owner answered it, cancelled
            assert future.done() and isinstance(future.exception(0), CancelledError)

    # ---------------------------------------------------------- replicas
    @precondition(lambda self: self.executor.held())
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        replica = data.draw(st.sampled_from(self.executor.held()))
        replica.complete(data.draw(st.integers(0, len(replica.held) - 1)))

    # Only replicas holding calls crash: the runtime learns of it at once (from the failed calls),
    # so its replacement is over before the next step. An idle replica that died would be found
    # by whichever later step dispatches to it, and its replacement would race that step.
    @precondition(lambda self: not self.stopped and self.executor.held())
    @rule(data=st.data(), replacement_fails=st.booleans())
    def crash(self, data: st.DataObject, replacement_fails: bool) -> None:
        replica = data.draw(st.sampled_from(self.executor.held()))
        self.executor.failing_starts = int(replacement_fails)
        replica.crash()
        _wait_for_replacements()
        self.executor.failing_starts = 0

    @precondition(lambda self: not self.stopped)
    @rule(tag=st.sampled_from(["s", "bt"]), replicas=st.integers(1, 3), start_fails=st.booleans())
    def scale(self, tag: str, replicas: int, start_fails: bool) -> None:
        self.executor.failing_starts = int(start_fails)
        config = self.srv.get_backend_config(tag)
        config.num_replicas = replicas
        try:
            self.srv.set_backend_config(tag, config)
        except RuntimeError as exc:
            assert "scripted" in str(exc)
        self.executor.failing_starts = 0

    @precondition(lambda self: not self.stopped)
    @rule(edited=st.booleans(), start_fails=st.booleans())
    def replace(self, edited: bool, start_fails: bool) -> None:
        self.executor.failing_starts = int(start_fails)
        try:
            self.srv.create_backend(answer_edited if edited else answer, "s", replace=True)
        except RuntimeError as exc:
            assert "scripted" in str(exc)
        self.executor.failing_starts = 0

    # ----------------------------------------------------------- traffic
    @precondition(lambda self: not self.stopped)
    @rule(weights=st.sampled_from([{"s": 1.0}, {"i": 1.0}, {"s": 0.5, "i": 0.5}, {"bt": 1.0}]))
    def link_later(self, weights: dict[str, float]) -> None:
        self.srv.split("later", weights)

    # -------------------------------------------------------------- time
    @rule(seconds=st.sampled_from([0.005, 0.03, 0.1, 0.5, 2.5]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: not self.stopped)
    @rule()
    def shutdown(self) -> None:
        self.srv.shutdown()
        self.stopped = True
        self._check_all_done()

    # ------------------------------------------------------------ checks
    @invariant()
    def resolved_at_most_once(self) -> None:
        _wait_for_replacements()  # a dead replica found by any step is replaced before the next one
        assert all(count <= 1 for count in self.resolutions.values()), self.resolutions
        assert all(count <= 1 for count in self.nested_answers.values()), self.nested_answers
        # A second resolution raises InvalidStateError where it happens: on this thread (the step
        # fails), in a future's callback (logged by concurrent.futures), or on a helper thread.
        assert not self.failures.records, [r.getMessage() for r in self.failures.records]
        assert not self.thread_errors, self.thread_errors

    def _check_all_done(self) -> None:
        pending = [i for i, future in enumerate(self.futures) if not future.done()]
        assert not pending, f"futures still pending after shutdown: {pending}"
        assert all(count == 1 for count in self.resolutions.values()), self.resolutions
        assert all(count == 1 for count in self.nested_answers.values()), self.nested_answers
        for future in self.futures:  # every stream ends for its reader: none waits for items that never come
            if not future.cancelled() and future.exception() is None and isinstance(future.result(), ItemStream):
                _read_to_the_end(future.result())

    def teardown(self) -> None:
        self.srv.shutdown()
        threading.excepthook = self._excepthook
        for name in ("serve_core", "concurrent.futures"):
            logging.getLogger(name).removeHandler(self.failures)
        assert not self.thread_errors, self.thread_errors
        self._check_all_done()
        assert not self.failures.records, [r.getMessage() for r in self.failures.records]


def _read_to_the_end(stream: ItemStream) -> None:
    for _ in range(100):
        try:
            if not stream.read(0):
                return
        except TimeoutError:
            raise AssertionError("a stream was left open after shutdown: its reader would wait forever") from None
        except Exception:  # noqa: BLE001 - ended with its error (mid-stream, shutdown, replica died)
            pass
    raise AssertionError("a stream never ended")


Scheduler.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestScheduler = Scheduler.TestCase

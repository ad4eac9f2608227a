"""No-op calls on Ray: our handle on the ray executor against a bare Ray actor call.

Run from the repository root (Ray installed)::

    python bench/bench_ray.py [--rounds 7] [--sequential 1000] [--in-flight 1000] [--json out.json]

Every workload runs in the same process against the same local Ray, in interleaved
rounds; the table shows medians per call and the ratio to the bare actor baseline
(``ray.get(actor.f.remote())``). Workloads:

* one at a time: call, wait for the result, repeat;
* N in flight: submit N calls, then wait for all of them.

Rows: the bare actor (baseline); our handle on the ray executor, one replica, default
config (up to 32 calls held by the replica); our handle with
``max_concurrent_queries=1`` (the original's one call at a time); with
``max_batch_size=100`` (many queries per user call); with
``max_concurrent_queries=1000``; and, when ``ray[serve]`` is installed, Ray Serve's own
``DeploymentHandle`` (one replica, HTTP proxy disabled). The target is our handle, on
the default config, within 1.5x of the bare call.

Two more rows show what any handle pays on top of that baseline: the bare call with
one bytes argument (a real call carries data; Ray handles any argument at a cost), and
the same call whose reply is read by another thread (blocked in ``ray.get``, oldest
call first), as any handle that blocks no thread per call must: the floor of our design.

Garbage is collected before every timed workload, so that no row pays for another's.

Recovery (``--recoveries N``, default 5 per row; 0 skips it): a replica holding one running
call and ten more is killed, by each kind of crash (SIGKILL from outside, ``os._exit`` in
the running call, ``ray.kill``), with the warm spare and without it (``warm_spare=False``,
the replacement waits for Ray to start a worker, as before there were spares). The table
shows, median and worst of N: from the kill to the death being seen (the running call
failing), from then to the first held call answered by the replacement, and how many of
the ten held calls failed. Each round starts 2 s after the previous one's recovery, so the
new spare is up (crashes rarely come back to back). ``--busy K`` keeps K busy-looping
processes running meanwhile: the machine as loaded as the tests of other sessions leave it.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from functools import partial
from typing import Any

import ray

import serve_core
from serve_core import BackendConfig, Serve
from serve_core.executors.ray import RayExecutor

Workload = Callable[[], None]


class BareActor:
    def f(self, data: bytes | None = None) -> None:
        return None


def noop(request: Any) -> None:
    return None


@serve_core.accept_batch
def noop_batch(request: list[Any]) -> list[None]:
    return [None] * len(request)


PIPELINED = 1000  # max_concurrent_queries of the deep-pipeline row


def _ours(batch: bool = False, pipelined: int | None = None) -> tuple[Serve, Any]:
    srv = Serve(executor="ray", start_server=False)
    srv.create_endpoint("noop", None)
    config = BackendConfig(max_batch_size=100 if batch else None, max_concurrent_queries=pipelined)
    srv.create_backend(noop_batch if batch else noop, "noop:v1", backend_config=config)
    srv.link("noop", "noop:v1")
    return srv, srv.get_handle("noop")


def _ray_serve_handle() -> Any | None:
    try:
        from ray import serve as ray_serve
    except ImportError:
        return None

    # Serve queues calls beyond max_ongoing_requests (default 5) in its router with back-off;
    # allow all of them to reach the replica, like the bare actor.
    @ray_serve.deployment(num_replicas=1, max_ongoing_requests=1000)
    class Noop:
        def __call__(self) -> None:
            return None

    ray_serve.start(proxy_location="Disabled")
    return ray_serve.run(Noop.bind(), name="bench_noop", route_prefix=None)


def _workloads(
    calls: dict[str, Callable[[], Any]], wait: dict[str, Callable[[Any], Any]], n: int, in_flight: int
) -> dict[str, tuple[Workload, Workload]]:
    """For each row: (``n`` calls one at a time, ``in_flight`` calls submitted then awaited)."""

    def sequential(call: Callable[[], Any], done: Callable[[Any], Any]) -> Workload:
        def run() -> None:
            for _ in range(n):
                done(call())

        return run

    def many(call: Callable[[], Any], done: Callable[[Any], Any]) -> Workload:
        def run() -> None:
            pending = [call() for _ in range(in_flight)]
            for item in pending:
                done(item)

        return run

    return {name: (sequential(calls[name], wait[name]), many(calls[name], wait[name])) for name in calls}


def _measure(
    workloads: dict[str, tuple[Workload, Workload]], rounds: int, n: int, in_flight: int
) -> dict[str, dict[str, float]]:
    """Median µs per call of each workload, rounds interleaved across rows."""
    samples: dict[str, dict[str, list[float]]] = {k: {"one": [], "many": []} for k in workloads}
    for one, many in workloads.values():  # warm up every path once
        one()
        many()
    for _ in range(rounds):
        for name, (one, many) in workloads.items():
            for key, workload, count in (("one", one, n), ("many", many, in_flight)):
                gc.collect()
                start = time.perf_counter()
                workload()
                samples[name][key].append((time.perf_counter() - start) / count * 1e6)
    return {k: {w: statistics.median(v) for w, v in s.items()} for k, s in samples.items()}


def _report(medians: dict[str, dict[str, float]], in_flight: int) -> dict[str, Any]:
    base = medians["bare actor"]
    rows = {
        name: {
            "one_at_a_time_us": m["one"],
            "one_at_a_time_ratio": m["one"] / base["one"],
            "in_flight_us": m["many"],
            "in_flight_ratio": m["many"] / base["many"],
        }
        for name, m in medians.items()
    }
    many = f"{in_flight} in flight µs"
    print(f"{'workload':32s} {'1 at a time µs':>15s} {'ratio':>6s} {many:>20s} {'ratio':>6s}")
    for name, r in rows.items():
        print(
            f"{name:32s} {r['one_at_a_time_us']:15.1f} {r['one_at_a_time_ratio']:6.2f} "
            f"{r['in_flight_us']:20.1f} {r['in_flight_ratio']:6.2f}"
        )
    return rows


def _phase(
    title: str, calls: dict[str, Callable[[], Any]], wait: dict[str, Callable[[Any], Any]], args: Any
) -> dict[str, Any]:
    print(f"\n{title}")
    workloads = _workloads(calls, wait, args.sequential, args.in_flight)
    return _report(_measure(workloads, args.rounds, args.sequential, args.in_flight), args.in_flight)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sequential", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=1000)
    parser.add_argument("--recoveries", type=int, default=5, help="rounds per recovery row (0: skip)")
    parser.add_argument("--busy", type=int, default=0, help="busy-looping processes during the recovery rows")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a foreign cluster
    try:
        actor = ray.remote(BareActor).remote()
        bare_call, bare_wait = actor.f.remote, ray.get
        instances = {
            "serve_core handle": _ours(),
            "serve_core, 1 call at a time": _ours(pipelined=1),
            "serve_core, batch 100": _ours(batch=True),
            f"serve_core, {PIPELINED} calls/replica": _ours(pipelined=PIPELINED),
        }
        with_arg = partial(actor.f.remote, bytes(ARG_BYTES))
        with _reply_reader() as read_later:
            bare_rows = {"bare actor": bare_call, WITH_ARG: with_arg, FLOOR: lambda: read_later(with_arg())}
            calls = bare_rows | {name: h.remote for name, (_, h) in instances.items()}
            waits = {"bare actor": bare_wait, WITH_ARG: bare_wait, FLOOR: _result} | {n: _result for n in instances}
            results = {"serve_core": _phase("serve_core on the ray executor vs a bare actor", calls, waits, args)}
        for instance, _ in instances.values():
            instance.shutdown()
        # Ray Serve's controller keeps working in the background: measure it in its own
        # phase, against a bare-actor baseline taken in that same phase.
        serve_handle = _ray_serve_handle()
        if serve_handle is None:
            print("\nray[serve] is not installed: no DeploymentHandle comparison")
        else:
            results["ray_serve"] = _phase(
                "Ray Serve DeploymentHandle vs a bare actor",
                {"bare actor": bare_call, "ray serve DeploymentHandle": serve_handle.remote},
                {"bare actor": bare_wait, "ray serve DeploymentHandle": _result},
                args,
            )
        if args.recoveries:
            results["recovery"] = _recovery_phase(args.recoveries, args.busy)
        if args.json:
            with open(args.json, "w") as out:
                json.dump({"results": results, "args": vars(args)}, out, indent=2)
    finally:
        ray.shutdown()


def _result(future: Any) -> Any:
    return future.result()


WITH_ARG = "bare actor, one bytes argument"
ARG_BYTES = 80  # about the size of one pickled no-op call
FLOOR = "bare actor, argument, reply thread"


@contextmanager
def _reply_reader() -> Iterator[Callable[[Any], Future[Any]]]:
    """A thread reading replies in the order of the calls; yields ``ref -> Future``."""
    refs: queue.SimpleQueue[tuple[Any, Future[Any]] | None] = queue.SimpleQueue()

    def read() -> None:
        while (item := refs.get()) is not None:
            ref, future = item
            future.set_result(ray.get(ref))

    def read_later(ref: Any) -> Future[Any]:
        future: Future[Any] = Future()
        refs.put((ref, future))
        return future

    reader = threading.Thread(target=read, name="bench-reply-reader")
    reader.start()
    try:
        yield read_later
    finally:
        refs.put(None)
        reader.join()


class Crashable:
    """Runs for ``seconds`` (touching ``started`` first), or ends its process after them (``exit``)."""

    def __call__(self, request: Any, i: int = 0, seconds: float = 0, started: str = "", exit: bool = False) -> int:
        if started:
            open(started, "w").close()
        time.sleep(seconds)
        if exit:
            os._exit(3)
        return i


CRASHES = ("SIGKILL", "os._exit in the call", "ray.kill")
HELD = 10  # calls the replica holds behind the running one when it dies
EXIT_AFTER_S = 0.2  # how long the os._exit call runs before it ends its process
REST_S = 2.0  # between rounds: the new spare comes up (slower on a busy machine)


def _recovery_phase(rounds: int, busy: int) -> dict[str, Any]:
    print(f"\nrecovery after a crash ({rounds} rounds per row, {HELD} calls held behind the running one"
          f"{f', {busy} busy processes' if busy else ''}; seconds, median / worst)")
    print(f"{'crash':24s} {'spare':>5s} {'death seen':>16s} {'replacement answers':>22s} {'held calls failed':>18s}")
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    rows: dict[str, Any] = {}
    logger = logging.getLogger("serve_core")
    level, logger.level = logger.level, logging.ERROR  # each crash logs two warnings by design
    try:
        for crash in CRASHES:
            for spare in (True, False):
                samples = [_recover_once(crash, spare) for _ in range(rounds)]
                seen, answered, failed = (sorted(column) for column in zip(*samples))
                rows[f"{crash}, spare={spare}"] = {"seen_s": seen, "recovered_s": answered, "failed": failed}
                print(f"{crash:24s} {'yes' if spare else 'no':>5s} {_spread(seen):>16s} "
                      f"{_spread(answered):>22s} {max(failed):>18d}")
    finally:
        logger.setLevel(level)
        for hog in hogs:
            hog.kill()
            hog.wait()
    return rows


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} / {values[-1]:.3f}"


def _recover_once(crash: str, spare: bool) -> tuple[float, float, int]:
    """One crash of a replica holding a running call and :data:`HELD` more: (seen, recovered, failed)."""
    srv = Serve(executor=RayExecutor(warm_spare=spare), start_server=False)
    try:
        srv.create_endpoint("c", None)
        srv.create_backend(Crashable, "c:v1")
        srv.link("c", "c:v1")
        handle = srv.get_handle("c")
        handle.remote().result(60)
        time.sleep(REST_S)  # the spare comes up
        exits = crash.startswith("os._exit")
        with tempfile.TemporaryDirectory() as folder:
            started = os.path.join(folder, "started")
            running = handle.remote(seconds=EXIT_AFTER_S if exits else 60, started=started, exit=exits)
            held = [handle.remote(i=i) for i in range(HELD)]
            deadline = time.monotonic() + 60
            while not os.path.exists(started) and time.monotonic() < deadline:
                time.sleep(0.002)
            began = time.perf_counter()
        (replica,) = srv.replicas("c:v1")
        killed = began + EXIT_AFTER_S if exits else time.perf_counter()
        if crash == "SIGKILL":
            os.kill(replica.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        elif crash == "ray.kill":
            ray.kill(replica.actor)  # type: ignore[attr-defined]
        running.exception(60)
        seen = time.perf_counter()
        first = _first_answer(held, 60)
        failed = sum(1 for f in held if f.exception(60) is not None)
        return seen - killed, first - seen, failed
    finally:
        srv.shutdown()


def _first_answer(futures: list[Future[Any]], timeout: float) -> float:
    """When the first of ``futures`` was answered with a result (now, if one already was)."""
    answered = threading.Event()
    for future in futures:
        future.add_done_callback(lambda f: f.exception() is None and answered.set())
    answered.wait(timeout)
    return time.perf_counter()


if __name__ == "__main__":
    main()

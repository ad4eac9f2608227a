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
"""

from __future__ import annotations

import argparse
import gc
import json
import queue
import statistics
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


if __name__ == "__main__":
    main()

"""Batching against its ideal: ``python -m bench.bench_batching [--rounds N]``.

The backend is a small numpy model, ``x @ W`` with ``W`` a 1024 x 1024 float32 matrix,
marked ``@accept_batch``; one replica on the thread executor, ``max_batch_size=32``. Two
ways to drive it, each against the same function called directly on batches of 32 (the
ideal: what the replica would do if serving cost nothing), rounds interleaved:

* ``4096 in flight``: one thread puts 4,096 handle calls in flight, then waits for all;
* ``64 callers``: 64 threads each make blocking calls (``remote().result()``) one after
  the other, 4,096 calls in all (at most 64 in flight, so batches of up to 32 form while
  the previous one runs).

Reported: items/s of each side (median of rounds), the ratio ours / direct (median of the
per-round ratios; issue 16's target is >= 0.8 for 4,096 in flight), and the serving cost
per item, ``1/ours - 1/direct`` in microseconds (target <= 15 us); then the same from the
process CPU time (all threads) of each side, which other processes' load does not inflate:
the steadier measure on a busy machine. BLAS runs on one thread
(``OPENBLAS_NUM_THREADS=1`` unless set).
"""

from __future__ import annotations

import argparse
import os

# One BLAS thread: OpenBLAS's own threads spin against the serving threads (and other load) on a
# small machine, which made the direct side swing 4x between runs; one thread keeps both sides alike.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import statistics
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from serve_core import BackendConfig, Serve, accept_batch

from .core_cases import WAIT

SIZE = 1024
BATCH = 32
ITEMS = 4096
CALLERS = 64


def _model() -> Callable[..., list[Any]]:
    weights = np.random.default_rng(0).standard_normal((SIZE, SIZE), dtype=np.float32)

    @accept_batch
    def model(requests: list[Any], x: list[np.ndarray]) -> list[np.ndarray]:
        return list(np.stack(x) @ weights)

    return model


def collect(futures: list[Any]) -> list[Any]:
    """Every call's answer, read as a caller would (bounded waits)."""
    return [future.result(WAIT) for future in futures]


def direct(model: Callable[..., list[Any]], vectors: list[np.ndarray]) -> None:
    """The model called on consecutive batches of :data:`BATCH`."""
    for i in range(0, len(vectors), BATCH):
        chunk = vectors[i : i + BATCH]
        model([None] * len(chunk), x=chunk)


def in_flight(remote: Callable[..., Any], vectors: list[np.ndarray]) -> None:
    """One thread puts every call in flight, then reads every answer."""
    collect([remote(x=vector) for vector in vectors])


def callers(remote: Callable[..., Any], vectors: list[np.ndarray], threads: int = CALLERS) -> None:
    """``threads`` threads each make blocking calls one after the other."""
    share = [vectors[i::threads] for i in range(threads)]

    def work(mine: list[np.ndarray]) -> None:
        for vector in mine:
            remote(x=vector).result(WAIT)

    pool = [threading.Thread(target=work, args=(part,)) for part in share]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(WAIT)


def timed(run: Callable[[], None]) -> tuple[float, float]:
    """Wall and process CPU seconds (all threads) of ``run()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (median reported)")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    model = _model()
    vectors = list(np.random.default_rng(1).standard_normal((ITEMS, SIZE), dtype=np.float32))
    items = len(vectors)
    with Serve(executor="thread", start_server=False) as srv:
        srv.create_endpoint("model", None)
        config = BackendConfig(max_batch_size=BATCH, max_queue_size=2 * ITEMS)
        srv.create_backend(model, "model:v1", backend_config=config)
        srv.link("model", "model:v1")
        remote = srv.get_handle("model").remote
        in_flight(remote, vectors[:256])  # warm up
        print(
            f"{'case':<16} {'ours items/s':>13} {'direct':>10} {'ratio':>7} {'cost/item':>10} "
            f"{'CPU ratio':>10} {'CPU/item':>10}"
        )
        for name, drive in (("4096 in flight", in_flight), ("64 callers", callers)):
            ours, base = [], []
            for index in range(args.rounds):
                sides = [partial(drive, remote, vectors), partial(direct, model, vectors)]
                first, second = (timed(side) for side in (sides if index % 2 else sides[::-1]))
                o, b = (first, second) if index % 2 else (second, first)
                ours.append(o)
                base.append(b)
            wall = statistics.median(b[0] / o[0] for o, b in zip(ours, base))  # ours / direct in items/s
            cpu = statistics.median(b[1] / o[1] for o, b in zip(ours, base))
            o_wall, b_wall = statistics.median(o[0] for o in ours), statistics.median(b[0] for b in base)
            o_cpu, b_cpu = statistics.median(o[1] for o in ours), statistics.median(b[1] for b in base)
            print(
                f"{name:<16} {items / o_wall:13,.0f} {items / b_wall:10,.0f} {wall:6.2f}x "
                f"{(o_wall - b_wall) / items * 1e6:8.1f} us {cpu:9.2f}x {(o_cpu - b_cpu) / items * 1e6:8.1f} us"
            )
    print(f"load average (1 min) {load:.2f} before, {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()

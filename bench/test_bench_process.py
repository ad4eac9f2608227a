"""pytest-benchmark entry for the process executor benchmark (ratios in ``extra_info``)."""

from __future__ import annotations

from typing import Any

from bench.bench_process import report, run


def test_process_executor_ratios(benchmark: Any) -> None:
    results = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(results)
    print("\n" + report(results))

"""Benchmark helpers shared by every file in bench/: ratio tables against in-run baselines.

A benchmark joins a comparison by setting ``benchmark.group`` and
``benchmark.extra_info["role"]``: one test per group is the ``"baseline"`` (the floor
measured in the same run), the others are subjects. An optional
``extra_info["target_ratio"]`` on a subject is printed as a target next to its ratio.
At the end of the run a table prints each subject's median and min time over its
baseline's. Speed is never asserted: machines differ, ratios are for people.
"""

from __future__ import annotations

from typing import Any

import pytest

BASELINE = "baseline"


def _rows(benchmarks: list[Any]) -> list[tuple[str, str, float, float, str]]:
    by_group: dict[str, list[Any]] = {}
    for bench in benchmarks:
        by_group.setdefault(bench.group or "", []).append(bench)
    rows = []
    for group, members in sorted(by_group.items()):
        baselines = [b for b in members if b.extra_info.get("role") == BASELINE]
        if len(baselines) != 1:
            continue
        base = baselines[0].stats
        for bench in members:
            if bench is baselines[0]:
                continue
            target = bench.extra_info.get("target_ratio")
            median = bench.stats.median / base.median
            verdict = ""
            if target is not None:
                verdict = f"target {target:g}x: {'met' if median <= target else 'MISSED'}"
            rows.append((group, bench.name, median, bench.stats.min / base.min, verdict))
    return rows


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Print subject/baseline ratios for every benchmark group that has a baseline."""
    session = getattr(config, "_benchmarksession", None)
    benchmarks = [b for b in getattr(session, "benchmarks", []) if b]
    rows = _rows(benchmarks)
    if not rows:
        return
    terminalreporter.section("ratios against in-run baselines (lower is better)")
    width = max(len(name) for _, name, *_ in rows)
    group = None
    for row_group, name, median, minimum, verdict in rows:
        if row_group != group:
            group = row_group
            terminalreporter.write_line(f"{group}:")
        terminalreporter.write_line(
            f"  {name:<{width}}  median {median:8.2f}x  min {minimum:8.2f}x  {verdict}".rstrip()
        )

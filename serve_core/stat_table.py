"""``serve-core stat``'s table: one row per endpoint and per backend, from ``stat()``'s flat dict.

The flat keys are the original's (``<backend>_latency_s_<p>th_perc_<w>_window``...) plus ours
(``backend_<tag>_queue_size``, ``endpoint_<name>_request_counter``...); this module reads
them back for one window and a few percentiles. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

TABLE_PERCENTILES = (50, 90, 99)


def _between(key: str, prefix: str, suffix: str) -> str | None:
    if key.startswith(prefix) and key.endswith(suffix) and len(key) > len(prefix) + len(suffix):
        return key[len(prefix):len(key) - len(suffix)]
    return None


def _label(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def stat_table(stats: Mapping[str, float], window: float, percentiles: Sequence[float] = TABLE_PERCENTILES) -> str:
    """Endpoints (requests, errors, waiting for traffic) and backends (requests, errors, latency
    percentiles in ms over ``window`` seconds, queue length, replicas) as aligned text."""
    endpoints = sorted(
        name for key in stats if (name := _between(key, "endpoint_", "_request_counter")) is not None
    )
    backends = sorted(tag for key in stats if (tag := _between(key, "backend_", "_num_replicas")) is not None)
    rows = [["endpoint", "requests", "errors", "waiting"]]
    for name in endpoints:
        rows.append([
            name,
            _count(stats.get(f"endpoint_{name}_request_counter")),
            _count(stats.get(f"endpoint_{name}_error_counter")),
            _count(stats.get(f"endpoint_{name}_pending_size")),
        ])
    heads = [f"p{_label(p)} ms" for p in percentiles]
    backend_rows = [["backend", "requests", "errors", *heads, "queue", "replicas"]]
    for tag in backends:
        latencies = [
            _ms(stats.get(f"{tag}_latency_s_{_label(p)}th_perc_{_label(window)}_window")) for p in percentiles
        ]
        backend_rows.append([
            tag,
            _count(stats.get(f"{tag}_request_counter")),
            _count(stats.get(f"{tag}_error_counter")),
            *latencies,
            _count(stats.get(f"backend_{tag}_queue_size")),
            _count(stats.get(f"backend_{tag}_num_replicas")),
        ])
    note = f"latency over the last {_label(window)} s ('-': no call finished in it)"
    return f"{_format(rows)}\n\n{_format(backend_rows)}\n{note}\n"


def _count(value: float | None) -> str:
    return "-" if value is None else str(int(value))


def _format(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)

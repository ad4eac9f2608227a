"""What ``serve-core status`` shows: a store's live instances and registry, read from the store alone.

Nothing here imports backend code: the registry's records and the instances' heartbeats are
enough, so the command works from any shell that can reach the store.
"""

from __future__ import annotations

from typing import Any

from .persistence import RegistryStore
from .sync import live_instances


def status_report(store: RegistryStore, now: float, expiry_s: float) -> dict[str, Any]:
    """The store's state as JSON-ready data (see docs/sharing.md for the fields)."""
    snapshot = store.load()
    registry, problems = snapshot.registry(store.description)
    live, _ = live_instances(store.instance_records(), now, expiry_s)
    return {
        "store": store.description,
        "revision": snapshot.revision,
        "instances": [record.describe(now) for record in live],
        "endpoints": {
            name: {"route": info.route, "methods": list(info.methods), "traffic": registry.traffic.get(name)}
            for name, info in sorted(registry.endpoints.items())
        },
        "backends": {
            tag: {
                "desired": registry.configs[tag].num_replicas,
                "running": {record.instance_id: record.backends.get(tag, {}).get("running", 0) for record in live},
            }
            for tag in sorted(registry.backends)
        },
        "problems": problems,
    }


def format_status(report: dict[str, Any]) -> str:
    """The report as text: instances, endpoints with routes and traffic, backends with replicas."""
    lines = [f"store {report['store']}  (revision {report['revision']})", "", "instances"]
    if not report["instances"]:
        lines.append("  (none live)")
    for inst in report["instances"]:
        lag = "" if inst["revision"] == report["revision"] else f"  at revision {inst['revision']}"
        lines.append(
            f"  {inst['id']:<28} http {inst['http'] or '-':<22} {inst['executor']:<8} "
            f"seen {inst['last_seen_s']} s ago{lag}"
        )
    lines += ["", "endpoints"]
    if not report["endpoints"]:
        lines.append("  (none)")
    for name, ep in report["endpoints"].items():
        traffic = ep["traffic"]
        split = ", ".join(f"{tag} {weight:g}" for tag, weight in traffic.items()) if traffic else "no traffic"
        lines.append(f"  {name:<20} {ep['route'] or '(python only)':<20} {','.join(ep['methods']):<10} {split}")
    lines += ["", "backends"]
    if not report["backends"]:
        lines.append("  (none)")
    for tag, backend in report["backends"].items():
        running = ", ".join(f"{count} on {inst}" for inst, count in backend["running"].items()) or "none running"
        lines.append(f"  {tag:<20} desired {backend['desired']:<3} running: {running}")
    for key, why in report["problems"].items():
        lines.append(f"  ! {key}: {why}")
    return "\n".join(lines)

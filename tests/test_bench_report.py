"""``python -m bench.report --quick`` writes its Markdown and PNG plots (a tiny subset: this runs in CI)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from .conftest import require

REPO = Path(__file__).resolve().parents[1]


def test_quick_report_writes_markdown_and_plots(tmp_path: Path) -> None:
    require(importlib.util.find_spec("matplotlib") is not None, "matplotlib is missing: pip install -e '.[bench]'")
    out = tmp_path / "report"
    command = [sys.executable, "-m", "bench.report", "--quick", "--out", str(out), "--only", "core", "batching"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = (out / "REPORT.md").read_text(encoding="utf-8")
    assert report.startswith("# Benchmark report")
    for fact in ("usable cores", "load average", "packages: serve-core", "--quick"):
        assert fact in report
    assert "](core.png)" in report and "](batching.png)" in report
    assert "| thread |" in report and "| 16 |" in report  # a row of each table
    for plot in ("core.png", "batching.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

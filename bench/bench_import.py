"""Import time: ``python -c "import serve_core"`` against ``python -c "pass"``, measured alternately.

Usage::

    python bench/bench_import.py [--rounds 15]

Reports the median wall time of each and the difference (what importing serve_core costs),
plus ``-X importtime``'s own total for serve_core from one run. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()}")
    bare, ours = [], []
    for _ in range(args.rounds):
        bare.append(_run("pass"))
        ours.append(_run("import serve_core"))
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import serve_core"], capture_output=True, text=True, check=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    ).stderr
    total = re.search(r"\|\s*(\d+) \| serve_core$", out, re.MULTILINE)
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"python -c pass: {b * 1000:.0f} ms   import serve_core: {o * 1000:.0f} ms", end="   ")
    print(f"difference: {(o - b) * 1000:.0f} ms")
    if total:
        print(f"-X importtime, serve_core cumulative: {int(total.group(1)) / 1000:.0f} ms")
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()

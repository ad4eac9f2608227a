#!/usr/bin/env bash
# The one test command (README quick start): install, lint, type-check, test.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e '.[all,dev]'
python -m ruff check serve_core tests bench examples
python -m mypy
python -m pytest "$@"

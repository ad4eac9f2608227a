#!/usr/bin/env bash
# The one test command (README quick start): install, lint, type-check, test.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e '.[all,dev]'
# The dashboard's browser test drives Debian's chromium through playwright (no browser download).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
python -m ruff check serve_core tests bench examples
python -m mypy
python -m pytest "$@"

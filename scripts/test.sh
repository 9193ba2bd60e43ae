#!/usr/bin/env bash
# The test suite, as CI runs it: set up, then pytest (a run that executes no test fails).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"

#!/usr/bin/env bash
# The test suite, as CI runs it: set up, check the import layers (pyproject.toml [tool.importlinter]),
# then pytest (a run that executes no test fails). Extra arguments go to pytest, e.g. `--reverse`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest -q "$@"

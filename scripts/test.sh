#!/usr/bin/env bash
# The whole check, on a fresh machine: set up, then lint (ruff), types (mypy) and the test suite
# (unit + integration tests), showing the 15 slowest tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "ruff: lint and format"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "mypy"
bash scripts/typecheck.sh
# Two workers (most tests wait on real processes and sockets, not the CPU); a module's tests stay together.
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 -n 2 --dist loadfile "$@"

#!/usr/bin/env bash
# Set everything up, then run the whole suite: lint, types, unit, integration, netns.
# Arguments go to pytest: -m "not slow" is the fast inner loop (no fault matrix, soak, netns).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
echo "== ruff" && .venv/bin/ruff check src tests bench scripts && .venv/bin/ruff format --check src
echo "== mypy --strict" && .venv/bin/mypy
echo "== pytest"
exec .venv/bin/python -m pytest "$@"

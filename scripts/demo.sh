#!/usr/bin/env bash
# The main job on the built-in demo, from a fresh clone:
#   1. set up .venv (first run only);
#   2. build the demo models locally (a tiny Llama base and one expert per skill),
#      printing how the parents and simple merges score on the val and test splits;
#   3. search merges with `soup search experiment=demo` (TPE over every method, two
#      Ray workers, baselines first) and print the leaderboard;
#   4. score the 5 best candidates and the baselines on the held-out test splits;
#   5. export the best merge as a Hugging Face model folder (out/demo-best);
#   6. write the HTML report with its figures (runs/demo/report).
# Safe to run again: finished models are reused, a finished search only reprints its
# leaderboard, held-out scores already stored are kept, export and report are replaced.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_AUTH_MODE=disabled
PY=.venv/bin/python
SOUP=.venv/bin/soup
RUN=runs/demo
BEST=out/demo-best

echo "== 1/5  demo models (.cache/demo/models)"
$PY -m search.demo

echo
echo "== 2/5  soup search experiment=demo (Optuna over every merge method, 2 Ray workers)"
$SOUP search experiment=demo

echo
echo "== 3/5  soup evaluate $RUN --top 5 (held-out test splits, never seen by the search)"
$SOUP evaluate "$RUN" --top 5
$SOUP leaderboard "$RUN" --top 8

echo
echo "== 4/5  soup export $RUN $BEST --best"
$SOUP export "$RUN" "$BEST" --best --force

echo
echo "== 5/5  soup report $RUN"
$SOUP report "$RUN" --force

echo
echo "== done"
echo "   study, config and log:  $RUN/ (study.db, config.yaml, search.log)"
echo "   best merge:             $BEST/ (load it with AutoModelForCausalLM.from_pretrained)"
echo "   report:                 $RUN/report/index.html"
echo "   more trials:            $SOUP resume $RUN n_trials=150"

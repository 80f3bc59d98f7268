#!/usr/bin/env bash
# The main job on the built-in demo, from a fresh clone:
#   1. set up .venv (first run only);
#   2. build the demo models locally (a tiny Llama base and one expert per skill),
#      printing how the parents and simple merges score on the val and test splits;
#   3. merge a mergekit-style recipe with `soup merge` and score the merged folder
#      with the lm-eval adapter.
# Safe to run again: finished models are reused, the merge output is replaced.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python

echo "== 1/2  demo models (.cache/demo/models)"
$PY scripts/make_demo_models.py

echo
echo "== 2/2  soup merge conf/recipes/demo_ties.yaml .cache/demo/merged"
.venv/bin/soup merge conf/recipes/demo_ties.yaml .cache/demo/merged --force
$PY - <<'PYEOF'
import logging
logging.disable(logging.WARNING)
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from evaluators.base import TaskSpec
from evaluators.lm_eval import LmEvalEvaluator
torch.set_num_threads(2)
out = ".cache/demo/merged"
model = AutoModelForCausalLM.from_pretrained(out).eval()
tok = AutoTokenizer.from_pretrained(out)
for split, suffix in (("val", ""), ("test", "_test")):
    ev = LmEvalEvaluator([TaskSpec(f"soup_{s}{suffix}") for s in ("add", "reverse", "dup")])
    sc = ev.evaluate(model, tok)
    cells = "  ".join(f"{k.split('_')[1]} {v:.3f}" for k, v in sc.metrics.items())
    print(f"   merged model, {split:4s}: {cells}  mean {sc.objective:.3f}")
PYEOF
echo "== done: merged model in .cache/demo/merged (its recipe: .cache/demo/merged/recipe.yaml)"

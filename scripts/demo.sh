#!/usr/bin/env bash
# The main job on the built-in demo, from a fresh clone:
#   1. set up .venv (first run only),
#   2. build a tiny demo model family locally (no downloads),
#   3. merge it with a mergekit-style recipe (soup merge) and check the result loads.
# Safe to run again: finished steps are skipped or replaced.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python

echo "== building the demo family in .cache/demo/family"
$PY - <<'PYEOF'
from pathlib import Path
from search.tiny import save_family
root = Path(".cache/demo/family")
if (root / "expert_1" / "model.safetensors").is_file():
    print("   already built")
else:
    save_family(root, n_experts=2, arch="llama", hidden=64, layers=4, seed=0)
    print("   base + 2 experts written")
PYEOF

echo "== soup merge conf/recipes/demo_ties.yaml .cache/demo/merged"
.venv/bin/soup merge conf/recipes/demo_ties.yaml .cache/demo/merged --force

echo "== loading the merged model with transformers"
$PY - <<'PYEOF'
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = ".cache/demo/merged"
model = AutoModelForCausalLM.from_pretrained(out)
tok = AutoTokenizer.from_pretrained(out)
ids = tok("12+34=", return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits
params = sum(p.numel() for p in model.parameters())
print(f"   {type(model).__name__}: {params:,} parameters, logits {tuple(logits.shape)}")
print(f"   files: {', '.join(sorted(p.name for p in __import__('pathlib').Path(out).iterdir()))}")
PYEOF
echo "== done: the merged model is in .cache/demo/merged (recipe: .cache/demo/merged/recipe.yaml)"

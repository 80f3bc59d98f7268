"""The streaming executor's peak memory does not grow with the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import json, os, sys
import torch
torch.set_num_threads(1)
from transformers import AutoTokenizer  # noqa: F401  (import cost is not the merge's)
from tests.families import save_family
from search.recipe import Recipe
from search.merge.streaming import MergeOptions, merge_to_disk

layers, root = int(sys.argv[1]), sys.argv[2]
save_family(root, n_experts=3, hidden=256, layers=layers)
r = Recipe.from_dict({"merge_method": "ties", "base_model": f"{root}/base", "models": [
    {"model": f"{root}/expert_{i}", "parameters": {"weight": 1.0, "density": 0.5}}
    for i in range(3)]})
# a second process measures, so building the family does not set the peak
"""

MEASURE = r"""
import json, os, sys
import torch
torch.set_num_threads(1)
from transformers import AutoTokenizer  # noqa: F401
from search.recipe import Recipe
from search.merge.streaming import MergeOptions, merge_to_disk

root = sys.argv[1]
r = Recipe.from_dict({"merge_method": "ties", "base_model": f"{root}/base", "models": [
    {"model": f"{root}/expert_{i}", "parameters": {"weight": 1.0, "density": 0.5}}
    for i in range(3)]})
rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
merge_to_disk(r, f"{root}/out", MergeOptions(device="cpu"))
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status")
            if l.startswith("VmHWM:"))  # per process image; ru_maxrss survives exec
print(json.dumps({"delta": peak - rss}))
"""


def _run(code: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=300, check=True)
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def _input_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*.safetensors") if "out" not in p.parts)


def test_peak_memory_is_bounded_as_the_model_grows(tmp_path: Path) -> None:
    small, large = tmp_path / "small", tmp_path / "large"
    _run(PROBE, "2", str(small))
    _run(PROBE, "16", str(large))
    d_small = json.loads(_run(MEASURE, str(small)))["delta"]
    d_large = json.loads(_run(MEASURE, str(large)))["delta"]
    grown = _input_bytes(large) - _input_bytes(small)
    assert grown > 100 * 2**20  # the parents grew by more than 100 MiB...
    # ...while the merge's peak grew by less than a few tensors' worth
    assert d_large - d_small < 16 * 2**20, (d_small, d_large, grown)

"""Demo skills and the demo model build."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evaluators.skills import SKILLS, SPLITS, held_out_prompts, load_split, training_stream
from search.demo.tiny import byte_tokenizer
from search.demo.train import TrainConfig, build_model, is_complete, new_model, train

ROOT = Path(__file__).resolve().parents[3]


def test_splits_are_disjoint_sized_and_correct() -> None:
    for skill in SKILLS:
        val, test = (load_split(skill, s) for s in SPLITS)
        assert len(val) == len(test) == 200
        assert not {d["prompt"] for d in val} & {d["prompt"] for d in test}
    add = load_split("add", "val")[0]
    a, b = add["prompt"].rstrip("=").split("+")
    assert int(add["target"]) == int(a) + int(b)
    rev = load_split("reverse", "test")[0]
    assert rev["target"] == rev["prompt"][4:-1][::-1]


def test_training_never_sees_held_out_prompts() -> None:
    held = held_out_prompts()
    seen = [p for p, _ in itertools.islice(training_stream(SKILLS, seed=0), 20_000)]
    assert not held & set(seen)
    assert {p[:4] for p in seen} >= {"rev:", "dup:"}


def test_training_is_deterministic() -> None:
    tok = byte_tokenizer()
    cfg = TrainConfig(skills=("add",), steps=4, lr=1e-3, batch=8, seed=3)
    states = []
    for _ in range(2):
        model = new_model(seed=3)
        train(model, tok, cfg)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not torch.equal(states[0]["model.embed_tokens.weight"],
                           new_model(seed=3).state_dict()["model.embed_tokens.weight"])


def test_lora_job_saves_an_adapter_on_its_base(tmp_path: Path) -> None:
    """A ``lora`` job trains only LoRA factors on the init model and saves a PEFT adapter
    (no full copy) atomically; applied to its base it changes the targeted weights only."""
    pytest.importorskip("peft")
    from search.merge.sources import open_model

    threads = torch.get_num_threads()
    tok = byte_tokenizer()
    new_model(seed=1, hidden=32, layers=1).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    spec = {"name": "lora_add", "rank": 4}
    job = {"folder": str(tmp_path / "lora_add"), "spec": spec, "init": str(tmp_path / "base"),
           "train": TrainConfig(skills=("add",), steps=3, lr=1e-2, batch=8, seed=3),
           "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "up_proj"]}}
    try:
        assert build_model(job)["steps"] == 3
    finally:
        torch.set_num_threads(threads)
    folder = tmp_path / "lora_add"
    assert {p.name for p in folder.iterdir()} >= {"adapter_config.json",
                                                  "adapter_model.safetensors", "demo_build.json"}
    assert not (folder / "config.json").exists()
    assert not list(tmp_path.glob(".lora_add.*"))
    assert is_complete(folder, spec) and not is_complete(folder, {**spec, "rank": 8})
    base, merged = open_model(str(tmp_path / "base")), open_model(f"{tmp_path / 'base'}+{folder}")
    changed = {n for n in base.shapes if not torch.equal(base.read(n), merged.read(n))}
    assert changed == {"model.layers.0.self_attn.q_proj.weight",
                       "model.layers.0.mlp.up_proj.weight"}


@pytest.mark.slow
def test_full_build_has_the_searchable_shape(tmp_path: Path) -> None:
    """The real build (about 2 minutes): experts best at their skill, a merge wins."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "search.demo",
                    "--out", str(tmp_path)], check=True, env=env, timeout=600)
    table = json.loads((tmp_path / "table.json").read_text())
    for split in ("val", "test"):
        check = table["checks"][split]
        assert check["experts_best_at_own_skill"]
        assert not check["parents_good_at_all"]
        assert check["merges_beating_every_parent"]

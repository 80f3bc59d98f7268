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
from search.demo_train import TrainConfig, new_model, train
from search.tiny import byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.slow
def test_full_build_has_the_searchable_shape(tmp_path: Path) -> None:
    """The real build (about 2 minutes): experts best at their skill, a merge wins."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_models.py"),
                    "--out", str(tmp_path)], check=True, env=env, timeout=600)
    table = json.loads((tmp_path / "table.json").read_text())
    for split in ("val", "test"):
        check = table["checks"][split]
        assert check["experts_best_at_own_skill"]
        assert not check["parents_good_at_all"]
        assert check["merges_beating_every_parent"]

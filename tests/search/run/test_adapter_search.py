"""Searches over LoRA adapter parents, and with 4-bit (NF4) candidate evaluation, end to
end: real lm-eval scores, stored trials, the leaderboard, export."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from search import config
from search.cli import main
from search.run.launch import run_search
from tests.search.conftest import _memorize

pytest.importorskip("peft")
TASKS = "evaluator.tasks=[{name:soup_add,limit:16},{name:soup_dup,limit:16}]"


@pytest.fixture(scope="module")
def lora_experts(skilled_family: dict[str, Path],
                 tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """LoRA adapters (PEFT, r=8 on attention and MLP) on the skilled base, one memorizing
    the soup_add documents and one the soup_dup documents (a few seconds each)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluators.skills import load_split

    folder = tmp_path_factory.mktemp("lora-skilled")
    tok = AutoTokenizer.from_pretrained(skilled_family["base"])
    out = {}
    for skill in ("add", "dup"):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(skilled_family["base"],
                                                    dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                "gate_proj", "up_proj", "down_proj"]))
        _memorize(model, tok, load_split(skill, "val")[:16], 150, 3e-3)
        out[skill] = folder / f"lora_{skill}"
        model.save_pretrained(str(out[skill]))
    return out


def _search(run_dir: Path, base: Path, experts: list[str], *extra: str) -> Path:
    raw = config.compose_raw([
        f"run_dir={run_dir}", f"models.base={base}", f"models.experts=[{','.join(experts)}]",
        "models.build_demo=false", "study_name=s", "n_trials=6", "parallel=serial", TASKS,
        "space.methods=[linear,task_arithmetic,ties]", "sampler.n_startup_trials=2", *extra,
    ])
    run_search(config.from_hydra(raw), raw, show_progress=False)
    return run_dir


def _trials(run: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{run}/study.db")
    return study.get_trials()


def test_search_over_adapter_parents(lora_experts: dict[str, Path],
                                     skilled_family: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Adapter folders listed as experts (with one full checkpoint) are searched like any
    parent; the leaderboard lists them; export writes a loadable model."""
    base = skilled_family["base"]
    run = _search(tmp_path / "run", base, [str(lora_experts["add"]), str(lora_experts["dup"]),
                                           str(skilled_family["expert_both"])])
    trials = _trials(run)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 6, [t.user_attrs.get("error") for t in trials]
    models = {m["model"] for t in done for m in t.user_attrs["recipe"]["models"]}
    assert f"{base}+{lora_experts['add']}" in models
    parents = {t.user_attrs["recipe"]["models"][0]["model"]: t.user_attrs["scores"]["metrics"]
               for t in done if t.user_attrs.get("baseline") == "parent"}
    alone_add = parents[f"{base}+{lora_experts['add']}"]
    alone_dup = parents[f"{base}+{lora_experts['dup']}"]
    assert alone_add["soup_add"] > alone_dup["soup_add"]  # each adapter learned its skill
    assert alone_dup["soup_dup"] > alone_add["soup_dup"]

    assert main(["leaderboard", str(run), "--top", "0", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert len(rows) == 6
    assert any("lora_add" in r["models"] for r in rows)
    best = next(t for t in done if t.number == rows[0]["trial"])
    assert main(["export", str(run), str(tmp_path / "best"), "--best"]) == 0
    from transformers import AutoModelForCausalLM

    from search.recipe import Recipe

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "best")
    assert model.config.num_hidden_layers == 2
    exported = Recipe.load(tmp_path / "best" / "recipe.yaml")
    assert exported.hash() == Recipe.from_dict(best.user_attrs["recipe"]).hash()


def test_quantized_evaluation_search(skilled_family: dict[str, Path], tmp_path: Path) -> None:
    """evaluator.quantize=nf4: every candidate is scored with 4-bit linear layers; the
    parents' scores stay close to full precision (the experts memorized their data)."""
    pytest.importorskip("bitsandbytes")
    experts = [str(skilled_family[k]) for k in ("expert_add", "expert_dup")]
    run = _search(tmp_path / "q", skilled_family["base"], experts, "evaluator.quantize=nf4")
    trials = [t for t in _trials(run) if t.state == TrialState.COMPLETE]
    assert len(trials) == 6
    for t in trials:
        if t.user_attrs.get("baseline") == "parent":
            scores = t.user_attrs["scores"]["metrics"]
            own = "soup_add" if "expert_add" in t.user_attrs["recipe"]["models"][0]["model"] \
                else "soup_dup"
            assert scores[own] >= 0.5, scores

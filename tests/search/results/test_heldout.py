"""`soup evaluate` on a copy of a real finished search: stored records, an independent
re-computation, the leaderboard's test: columns, skipping, --force, failures, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from optuna.trial import create_trial

from search.recipe import Recipe
from search.study import heldout_key, heldout_scores
from tests.search.results.common import load_small as _load
from tests.search.results.common import soup as _soup

HELD = ["soup_add_test", "soup_dup_test"]
BASELINES = {"base", "parent", "uniform_soup", "greedy_soup"}


def _board(capsys: pytest.CaptureFixture[str], run: Path) -> dict[str, Any]:
    code, out, err = _soup(capsys, "leaderboard", str(run), "--top", "0", "--format", "json")
    assert code == 0, err
    return dict(json.loads(out))


@pytest.fixture
def run(small_study: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(small_study, tmp_path / "run"))


def _independent(recipe: Recipe, out: Path) -> dict[str, float]:
    """The recipe merged to disk by `soup merge`'s code path, loaded by transformers and
    scored by the lm-eval adapter: no worker, no resident model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluators.base import TaskSpec
    from evaluators.lm_eval import LmEvalEvaluator
    from search.merge.streaming import MergeOptions, merge_to_disk

    folder = merge_to_disk(recipe, out, MergeOptions(device="cpu"))
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    evaluator = LmEvalEvaluator([TaskSpec(name, limit=16) for name in HELD])
    return evaluator.evaluate(model, tokenizer).metrics


def test_evaluate_top2(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Records for the top 2 and the baselines, equal to an independent computation; the
    leaderboard shows them beside unchanged search columns; a rerun skips, --force redoes."""
    before = _board(capsys, run)
    code, out, err = _soup(capsys, "evaluate", str(run), "--top", "2", "--no-progress")
    assert code == 0, err
    rows = {r["trial"]: r for r in before["rows"]}
    top2 = [r["trial"] for r in before["rows"][:2]]
    baselines = [r["trial"] for r in before["rows"]
                 if BASELINES & set(r["baseline"].split(","))]
    records = heldout_scores(_load(run).user_attrs)
    assert set(records) == {*top2, *baselines}
    assert len({rows[n]["recipe_hash"] for n in records}) == len(records)
    for record in records.values():
        assert record["tasks"] == HELD and record["n_docs"] == {t: 16 for t in HELD}
        assert record["objective"] == pytest.approx(sum(record["metrics"].values()) / 2)
        assert "error" not in record and record["time_s"] > 0 and record["at"]
    assert f"{len(records)} evaluated, 0 skipped, 0 failed" in out

    searched = next((n for n in top2 if not rows[n]["baseline"]), top2[0])
    recipe = Recipe.from_dict(_load(run).trials[searched].user_attrs["recipe"])
    assert _independent(recipe, tmp_path / "merged") == records[searched]["metrics"]

    after = _board(capsys, run)
    assert after["heldout"] == HELD
    assert after["columns"]["heldout"] == [*(f"test:{t}" for t in HELD), "test:objective"]
    for new, old in zip(after["rows"], before["rows"], strict=True):
        assert {k: new[k] for k in ("trial", "objective", "metrics", "rank")} == \
            {k: old[k] for k in ("trial", "objective", "metrics", "rank")}
        record = records.get(new["trial"], {})
        assert new["heldout"] == record.get("metrics", {})
        assert new["heldout_objective"] == record.get("objective")
    _, table, _ = _soup(capsys, "leaderboard", str(run))
    header = table.splitlines()[0].split()
    assert header[6:13] == ["objective", "ci95", "soup_add", "soup_dup", "test:soup_add_test",
                            "test:soup_dup_test", "test:objective"]
    assert "test:* = held-out scores from `soup evaluate`" in table

    # a rerun skips what is stored: a tampered value survives it, --force replaces it
    study = _load(run)
    study.set_user_attr(heldout_key(searched), {**records[searched], "objective": -1.0})
    code, out, _ = _soup(capsys, "evaluate", str(run), "--top", "2", "--no-progress")
    assert code == 0 and f"0 evaluated, {len(records)} skipped" in out
    assert heldout_scores(_load(run).user_attrs)[searched]["objective"] == -1.0
    code, out, _ = _soup(capsys, "evaluate", str(run), "--top", "2", "--force",
                         "--no-baselines", "--no-progress")
    assert code == 0 and "2 evaluated, 0 skipped, 0 failed" in out
    assert heldout_scores(_load(run).user_attrs)[searched] | {"at": 0, "time_s": 0} == \
        records[searched] | {"at": 0, "time_s": 0}


def test_failing_candidate_stores_its_error(run: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A candidate that cannot be merged gets its error stored and reported, no score;
    a trial answered as a duplicate is never evaluated."""
    study = _load(run)
    experts = study.user_attrs["search"]["experts"]
    bad = {"merge_method": "linear", "models": [
        {"model": experts[0], "parameters": {"weight": 0.0}},
        {"model": experts[1], "parameters": {"weight": 0.0}}]}
    study.add_trial(create_trial(value=0.99, user_attrs={
        "recipe": bad, "scores": {"objective": 0.99, "metrics": {}}}))
    study.add_trial(create_trial(value=1.0, user_attrs={
        "recipe": bad, "scores": {"objective": 1.0, "metrics": {}}, "duplicate_of": 10}))
    code, out, err = _soup(capsys, "evaluate", str(run), "--top", "1", "--no-baselines",
                           "--no-progress")
    assert code == 1, err
    assert "trial 10 (rank 1): failed:" in out and "0 evaluated, 0 skipped, 1 failed" in out
    records = heldout_scores(_load(run).user_attrs)
    assert set(records) == {10}
    assert "metrics" not in records[10] and "objective" not in records[10]
    assert records[10]["error"] and records[10]["tasks"] == HELD
    row = _board(capsys, run)["rows"][0]
    assert (row["trial"], row["heldout_objective"]) == (10, None)
    assert row["heldout_error"] == records[10]["error"]
    _, table, _ = _soup(capsys, "leaderboard", str(run))
    assert "error" in table.splitlines()[1]
    assert "held-out evaluation failed for trial 10" in table


@pytest.mark.parametrize(("argv", "words"), [
    (["evaluate", "{missing}"], ["config.yaml not found"]),
    (["evaluate", "{run}", "--top", "0"], ["--top 0", "at least 1"]),
    (["evaluate", "{run}", "--top", "-2"], ["--top -2", "at least 1"]),
    (["evaluate", "{run}", "--tasks", "soup_dup_test,soup_add"],
     ["task soup_add:", "not held out"]),
    (["evaluate", "{run}", "--tasks", "soup_add_test,soup_nope"], ["soup_nope", "--tasks"]),
])
def test_bad_inputs(small_study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                    argv: list[str], words: list[str]) -> None:
    """User mistakes exit 2 with one line naming the input, before anything is loaded."""
    args = [a.format(run=small_study, missing=tmp_path / "nope") for a in argv]
    code, out, err = _soup(capsys, *args, "--no-progress")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    for word in words:
        assert word in err
    assert heldout_scores(_load(small_study).user_attrs) == {}

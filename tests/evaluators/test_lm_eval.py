"""The lm-eval adapter scores exactly what lm-eval scores, on the model in memory."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch

from evaluators.base import Evaluator, Scores, TaskSpec
from evaluators.lm_eval import EvaluatorError, LmEvalEvaluator
from evaluators.skills import load_split
from tests.evaluators.conftest import N_DOCS, WRONG, greedy_answers, memorized_answer

SPEC = TaskSpec("soup_add", doc_ids=tuple(range(N_DOCS)))


@pytest.fixture(scope="module")
def loaded(memorizer: Path) -> tuple[torch.nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(memorizer), AutoTokenizer.from_pretrained(memorizer)


@pytest.fixture(scope="module")
def evaluator() -> LmEvalEvaluator:
    return LmEvalEvaluator([SPEC, TaskSpec("soup_reverse", limit=8)], batch_size=8)


def test_model_answers_as_memorized(loaded: tuple[torch.nn.Module, object]) -> None:
    model, tok = loaded
    docs = load_split("add", "val")[:N_DOCS]
    answers = greedy_answers(model, tok, [d["prompt"] for d in docs])
    assert answers == [memorized_answer(i, d["target"]) for i, d in enumerate(docs)]


def test_score_equals_direct_computation(loaded: tuple[torch.nn.Module, object],
                                         evaluator: LmEvalEvaluator) -> None:
    model, tok = loaded
    scores = evaluator.evaluate(model, tok)
    assert isinstance(evaluator, Evaluator)
    assert scores.metrics["soup_add"] == pytest.approx(1 - len(WRONG) / N_DOCS)
    assert scores.n_docs == {"soup_add": N_DOCS, "soup_reverse": 8}
    assert scores.timings["total"] >= scores.timings["compute"] > 0


def test_score_equals_lm_eval_on_the_saved_model(memorizer: Path,
                                                 loaded: tuple[torch.nn.Module, object],
                                                 evaluator: LmEvalEvaluator) -> None:
    import lm_eval

    ids = list(range(N_DOCS))
    reference = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(memorizer), "device": "cpu"},
        tasks=["soup_add"], samples={"soup_add": ids}, task_manager=evaluator.manager,
        batch_size=4, log_samples=False, bootstrap_iters=0)
    theirs = reference["results"]["soup_add"]["exact_match,none"]
    ours = evaluator.evaluate(*loaded).metrics["soup_add"]
    assert 0 < ours < 1
    assert ours == theirs


def test_no_reload_and_no_answer_bleed_between_candidates(
        memorizer: Path, tmp_path: Path, evaluator: LmEvalEvaluator) -> None:
    """One resident model, rewritten in place between candidates, scored twice."""
    from search.merge.resident import ResidentModel, ResidentParents
    from search.recipe import Recipe
    from tests.families import save_family

    other = save_family(tmp_path, n_experts=0, hidden=64, layers=2, seed=5)["base"]
    resident = ResidentModel(ResidentParents([str(memorizer), str(other)], device="cpu"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(memorizer)

    def only(which: Path) -> Recipe:
        return Recipe.from_dict({"merge_method": "linear", "models": [
            {"model": str(memorizer), "parameters": {"weight": float(which == memorizer)}},
            {"model": str(other), "parameters": {"weight": float(which == other)}}]})

    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import TaskManager

    with mock.patch.object(TaskManager, "__init__", side_effect=AssertionError("reindexed")), \
         mock.patch.object(ConfigurableTask, "build_all_requests",
                           side_effect=AssertionError("requests rebuilt")):
        good = evaluator.evaluate(resident.materialize(only(memorizer)), tok)
        bad = evaluator.evaluate(resident.materialize(only(other)), tok)
        again = evaluator.evaluate(resident.materialize(only(memorizer)), tok)
    assert good.metrics["soup_add"] == pytest.approx(1 - len(WRONG) / N_DOCS)
    docs = load_split("add", "val")[:N_DOCS]
    direct = greedy_answers(resident.materialize(only(other)), tok, [d["prompt"] for d in docs])
    expected = sum(a == d["target"] for a, d in zip(direct, docs, strict=True)) / N_DOCS
    assert bad.metrics["soup_add"] == pytest.approx(expected)
    assert bad.metrics["soup_add"] != good.metrics["soup_add"]
    assert again.metrics == good.metrics


def test_stages_are_cumulative(loaded: tuple[torch.nn.Module, object]) -> None:
    ev = LmEvalEvaluator([SPEC], stages=(0.25, 0.5, 1.0))
    stages = list(ev.evaluate_stages(*loaded))
    assert [s.n_docs["soup_add"] for s in stages] == [4, 8, 16]
    assert [s.final for s in stages] == [False, False, True]
    # first four docs: doc 1 is wrong -> 3/4
    assert stages[0].metrics["soup_add"] == pytest.approx(0.75)
    assert stages[-1].metrics == ev.evaluate(*loaded).metrics


def test_seeded_subset_is_fixed_and_weights_combine() -> None:
    a = LmEvalEvaluator([TaskSpec("soup_dup", limit=5, seed=3, weight=2.0),
                         TaskSpec("soup_add", limit=3)])
    b = LmEvalEvaluator([TaskSpec("soup_dup", limit=5, seed=3)])
    ids_a = [d for d, _ in a.stages[0][0].docs]
    assert ids_a == [d for d, _ in b.stages[0][0].docs] and len(ids_a) == 5
    s = Scores({"x": 1.0, "y": 0.0}, {"x": 2.0, "y": 1.0}, {"x": 1, "y": 1})
    assert s.objective == pytest.approx(2 / 3) and s.objectives == (1.0, 0.0)


@pytest.mark.parametrize("kwargs,msg", [
    ({"tasks": [TaskSpec("soup_ad")]}, "did you mean 'soup_add'"),
    ({"tasks": [TaskSpec("soup_add", metric="acc,none")]}, "no metric 'acc,none'"),
    ({"tasks": [TaskSpec("soup_add", doc_ids=(5, 999))]}, "doc id 999"),
    ({"tasks": [TaskSpec("soup_add")], "stages": (0.5, 0.9)}, "must increase"),
    ({"tasks": []}, "no tasks"),
])
def test_bad_configuration(kwargs: dict, msg: str) -> None:
    with pytest.raises(EvaluatorError, match=None) as info:
        LmEvalEvaluator(**kwargs)
    assert msg in str(info.value)

"""Baselines: the parents, the uniform soup and the greedy soup as a pure function of scores."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest

from search.merge.methods import validate_recipe
from search.recipe import Recipe
from search.run import baselines as bl
from search.run.baselines import GreedyState, greedy_step, initial, soup

EXPERTS = ["/m/a", "/m/b", "/m/c"]
A, B, C = EXPERTS


def table(scores: dict[tuple[str, ...], float], dtype: str | None = None
          ) -> Callable[[Recipe], float | None]:
    """``score_of`` over soups given by their ingredients (in any order)."""
    by_hash = {soup([e for e in EXPERTS if e in key], dtype).hash(): v
               for key, v in scores.items()}
    asked: list[Recipe] = []

    def score_of(recipe: Recipe) -> float | None:
        asked.append(recipe)
        return by_hash.get(recipe.hash())

    score_of.asked = asked  # type: ignore[attr-defined]
    return score_of


def run_to_end(experts: Sequence[str], scores: dict[tuple[str, ...], float]
               ) -> tuple[GreedyState, list[tuple[str, ...]]]:
    """Drives greedy_step like the driver: score each ``next`` from ``scores``; returns the
    final state and the soups evaluated, in order."""
    known = {k: v for k, v in scores.items() if len(k) == 1}
    evaluated: list[tuple[str, ...]] = []
    for _ in range(10):
        state = greedy_step(experts, table(known))
        if state.done:
            return state, evaluated
        assert state.next is not None
        key = state.next.model_names
        evaluated.append(key)
        known[key] = scores[key]
    raise AssertionError("greedy soup did not finish")


def test_soup_is_a_uniform_linear_recipe() -> None:
    """A plain model soup: linear, weight 1 each, no base, valid."""
    r = soup([A, B], dtype="bfloat16")
    assert r.merge_method == "linear" and r.base_model is None and r.dtype == "bfloat16"
    assert r.model_names == (A, B)
    assert [m.parameters for m in r.models] == [{"weight": 1.0}, {"weight": 1.0}]
    validate_recipe(r)


def test_soup_hash_is_stable() -> None:
    """The hash dedup relies on: equal across calls and round trips, pinned by value."""
    assert soup(["a", "b"]).hash() == "11e4370334d8b6a4"
    assert soup(["a", "b"]).hash() == Recipe.from_dict(soup(["a", "b"]).to_dict()).hash()
    assert soup(["a", "b"]).hash() == Recipe.from_yaml(soup(["a", "b"]).to_yaml()).hash()
    assert soup(["a", "b"]).hash() != soup(["b", "a"]).hash()  # order is kept
    assert soup(["a", "b"]).hash() != soup(["a", "b"], "bfloat16").hash()


def test_initial() -> None:
    """The base, each parent, then the uniform soup of all experts, tagged."""
    out = initial("/m/base", EXPERTS, dtype="float16")
    assert [tag for tag, _ in out] == [bl.BASE, bl.PARENT, bl.PARENT, bl.PARENT, bl.UNIFORM]
    assert [r.model_names for _, r in out] == [("/m/base",), (A,), (B,), (C,), (A, B, C)]
    assert all(r.dtype == "float16" for _, r in out)
    assert all(r == soup(r.model_names, "float16") for _, r in out)


def test_initial_one_expert_has_no_uniform_soup() -> None:
    """With one expert the uniform soup is the parent itself: not listed twice."""
    assert [tag for tag, _ in initial("/m/base", [A])] == [bl.BASE, bl.PARENT]


def test_parents_unscored_is_not_done() -> None:
    """Until every parent is scored, there is nothing to evaluate and no soup."""
    for scores in ({}, {(A,): 0.5, (B,): 0.7}):
        state = greedy_step(EXPERTS, table(scores))
        assert state == GreedyState(None, False, (), None, None)


def test_first_step_mixes_the_two_best_in_expert_order() -> None:
    """Parents are ranked by score; the first candidate adds the second best."""
    score_of = table({(A,): 0.5, (B,): 0.7, (C,): 0.6})
    state = greedy_step(EXPERTS, score_of)
    assert not state.done and state.recipe is None
    assert state.ingredients == (B,) and state.score == 0.7
    assert state.next == soup([B, C])  # listed in expert order, not rank order


def test_candidate_added_only_on_strict_improvement() -> None:
    """An equal score is not an improvement; a higher one is."""
    scores = {(A,): 0.5, (B,): 0.7, (C,): 0.6, (B, C): 0.7, (A, B): 0.8}
    state, evaluated = run_to_end(EXPERTS, scores)
    assert evaluated == [(B, C), (A, B)]
    assert state.done and state.next is None
    assert state.ingredients == (A, B)
    assert state.recipe == soup([A, B])
    assert state.score == 0.8


def test_every_candidate_improves() -> None:
    """All experts end up in the soup when each step improves it."""
    scores = {(A,): 0.1, (B,): 0.3, (C,): 0.2, (B, C): 0.4, (A, B, C): 0.5}
    state, evaluated = run_to_end(EXPERTS, scores)
    assert evaluated == [(B, C), (A, B, C)]
    assert state.ingredients == (A, B, C) and state.recipe == soup(EXPERTS)


def test_no_candidate_improves() -> None:
    """The best parent alone is the greedy soup when no mix beats it."""
    scores = {(A,): 0.9, (B,): 0.3, (C,): 0.2, (A, B): 0.5, (A, C): 0.9}
    state, evaluated = run_to_end(EXPERTS, scores)
    assert evaluated == [(A, B), (A, C)]
    assert state.ingredients == (A,) and state.recipe == soup([A]) and state.score == 0.9


def test_ties_between_parents_keep_expert_order() -> None:
    """Equal parent scores rank in expert order."""
    state = greedy_step(EXPERTS, table({(A,): 0.5, (B,): 0.5, (C,): 0.5}))
    assert state.ingredients == (A,)
    assert state.next == soup([A, B])


def test_failed_recipes_scored_minus_inf() -> None:
    """A failed parent ranks last; a failed candidate is skipped, never added."""
    scores = {(A,): -math.inf, (B,): 0.7, (C,): 0.6, (B, C): -math.inf, (A, B): 0.9}
    state, evaluated = run_to_end(EXPERTS, scores)
    assert evaluated == [(B, C), (A, B)]
    assert state.ingredients == (A, B) and state.score == 0.9
    everything_failed = {(A,): -math.inf, (B,): -math.inf, (C,): -math.inf,
                         (A, B): -math.inf, (A, C): -math.inf}
    state, _ = run_to_end(EXPERTS, everything_failed)
    assert state.done and state.ingredients == (A,) and state.score == -math.inf


def test_resume_from_partial_scores() -> None:
    """A later call continues where stored scores stop (a resumed driver)."""
    scores = {(A,): 0.5, (B,): 0.7, (C,): 0.6, (B, C): 0.75}
    state = greedy_step(EXPERTS, table(scores))
    assert state.ingredients == (B, C) and state.score == 0.75
    assert state.next == soup([A, B, C])


def test_final_recipe_in_expert_order() -> None:
    """The finished soup lists its ingredients in the experts' order, not by rank."""
    experts = ["/m/z", "/m/y", "/m/x"]
    z, y, x = experts
    known = {soup([x]).hash(): 0.9, soup([y]).hash(): 0.5, soup([z]).hash(): 0.1,
             soup([y, x]).hash(): 0.95, soup([z, y, x]).hash(): 0.99}
    state = greedy_step(experts, lambda r: known.get(r.hash()))
    assert state.done
    assert state.ingredients == (z, y, x)
    assert state.recipe is not None and state.recipe.model_names == (z, y, x)


def test_one_expert_is_done_at_once() -> None:
    """One scored expert: the greedy soup is that expert."""
    state = greedy_step([A], table({(A,): 0.4}))
    assert state == GreedyState(None, True, (A,), soup([A]), 0.4)


def test_dtype_is_passed_through() -> None:
    """Soups carry the dtype, so scores stored for them are found again."""
    score_of = table({(A,): 0.5, (B,): 0.7, (C,): 0.6}, dtype="bfloat16")
    assert greedy_step(EXPERTS, score_of).ingredients == ()
    state = greedy_step(EXPERTS, score_of, dtype="bfloat16")
    assert state.next == soup([B, C], "bfloat16")


@pytest.mark.parametrize("score", [None, 0.7])
def test_score_of_is_only_asked_for_soups(score: float | None) -> None:
    """greedy_step asks about parents and candidate soups only."""
    score_of = table({(A,): 0.5, (B,): 0.7, (C,): 0.6} | ({(B, C): score} if score else {}))
    greedy_step(EXPERTS, score_of)
    asked = score_of.asked  # type: ignore[attr-defined]
    assert all(r.merge_method == "linear" for r in asked)
    assert asked[:3] == [soup([A]), soup([B]), soup([C])]

"""Model names and parameter symbols as the leaderboard, the report and the card show
them: one naming rule (search.names) and the specs' symbols and left-out values."""

from __future__ import annotations

from typing import Any

import optuna
import pytest
from optuna.trial import create_trial

from search.recipe import ModelEntry, Recipe
from search.results.card import CardFacts, model_card
from search.results.leaderboard import Leaderboard, short_params
from search.results.report import data as rd
from search.results.report.page import build_report
from search.run.baselines import soup

CLASH = ["/runs/a/checkpoint", "/runs/b/checkpoint"]  # the space names them m0, m1


def _ties(experts: list[str], weights: tuple[float, ...]) -> Recipe:
    return Recipe("ties", tuple(ModelEntry(e, {"weight": w, "density": 0.5})
                                for e, w in zip(experts, weights, strict=False)),
                  "/m/base", {"lambda": 1.0})


def _study(experts: list[str], recipes: list[Recipe]) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = optuna.create_study(direction="maximize")
    s.set_user_attr("search", {"tasks": ["t"], "objective": "mean", "base": "/m/base",
                               "experts": experts})
    for i, recipe in enumerate(recipes):
        s.add_trial(create_trial(value=0.1 * i, user_attrs={
            "recipe": recipe.to_dict(), "scores": {"metrics": {"t": 0.1 * i},
                                                   "objective": 0.1 * i}}))
    return s


@pytest.fixture(scope="module")
def clash() -> optuna.Study:
    return _study(CLASH, [soup(["/m/base"]), soup(CLASH[:1]), soup(CLASH),
                          _ties(CLASH, (0.7, 0.3)), _ties(CLASH[1:], (0.9,))])


def test_leaderboard_names_models_as_the_space_does(clash: optuna.Study) -> None:
    """Two experts with one folder name are m0 and m1 (their parameter keys), not
    'checkpoint' twice; the base keeps its folder name."""
    board = Leaderboard.from_study(clash)
    models = {r["trial"]: r["models"] for r in board.rows}
    assert models == {0: "base", 1: "m0", 2: "m0+m1", 3: "m0+m1", 4: "m1"}
    assert board.names == {CLASH[0]: "m0", CLASH[1]: "m1", "/m/base": "base"}


def test_unique_names_unchanged() -> None:
    """Distinct folder names, and adapters on one base, show their folder names."""
    experts = ["/m/base+/m/lora_add", "/m/base+/m/lora_dup"]
    board = Leaderboard.from_study(_study(experts, [soup(experts), soup(["/m/base"])]))
    assert sorted(r["models"] for r in board.rows) == ["base", "lora_add+lora_dup"]


def test_axes_name_left_out_experts_with_the_specs_value(clash: optuna.Study) -> None:
    """Parallel coordinates: PARAM.NAME axes, an expert missing from a recipe at the
    weight spec's left-out value (0); density has none, so it stays empty."""
    board = Leaderboard.from_study(clash)
    trials = {t.number: t for t in clash.get_trials()}
    rows = [r for r in board.rows if r["method"] == "ties"]
    axes = {a.name: a for a in rd.parallel_axes(rows, trials, CLASH, board.names)}
    assert list(axes) == ["method", "weight.m0", "weight.m1", "density.m0", "density.m1",
                          "lambda"]
    assert [r["trial"] for r in rows] == [4, 3]  # best first; trial 4 is m1 alone
    assert axes["weight.m0"].scaled == (0.0, 1.0)  # left out: weight 0, the low end
    assert axes["weight.m0"].ticks == ((0.0, "0"), (1.0, "0.7"))
    assert axes["density.m0"].scaled[0] != axes["density.m0"].scaled[0]  # NaN: no value
    assert rd.parallel_axes(rows, trials, CLASH) == list(axes.values())  # names derived


def test_report_facts_give_the_reference_behind_a_position_name(clash: optuna.Study) -> None:
    facts = dict(build_report(clash, "sqlite:///x.db").facts)
    assert facts["base"] == "base"
    assert facts["experts"] == f"m0 ({CLASH[0]}), m1 ({CLASH[1]})"


def test_lone_weight_hidden_only_where_it_cancels() -> None:
    """A parent (normalized linear soup of one model) shows no weight; a lone task
    vector's weight scales the merge, so it is shown."""
    assert short_params(soup(["/m/a"])) == ""
    lone = Recipe("task_arithmetic", (ModelEntry("/m/a", {"weight": 0.7}),), "/m/base",
                  {"lambda": 1.0})
    assert short_params(lone) == "w=0.70 λ=1.00"
    raw = Recipe("linear", (ModelEntry("/m/a", {"weight": 0.5}),), None, {"normalize": False})
    assert short_params(raw) == "w=0.50 normalize=false"
    assert short_params(Recipe("slerp", (ModelEntry("/m/a"),), "/m/b", {"t": 0.25})) == "t=0.25"


def _card(study: optuna.Study, recipe: Recipe, **kw: Any) -> str:
    trial = study.get_trials()[-1]
    facts = CardFacts.gather(study, trial, recipe, None, ("streaming", "cpu"))
    return model_card(facts if not kw else CardFacts(**{**facts.__dict__, **kw}))


def test_card_names_parents_as_the_leaderboard(clash: optuna.Study) -> None:
    recipe = _ties(CLASH, (0.7, 0.3))
    text = _card(clash, recipe)
    assert f"- `{CLASH[0]}` (expert; `m0`)" in text
    assert f"- `{CLASH[1]}` (expert; `m1`)" in text
    assert "- `/m/base` (base; `base`)" in text
    alone = _card(clash, recipe, names={})  # no study names: derived from the recipe
    assert "(expert; `m0`)" in alone and "(base; `base`)" in alone

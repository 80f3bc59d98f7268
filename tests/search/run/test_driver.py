"""The driver on real storage with simulated workers (a score from the recipe, no models):
whole searches and resumes take a second or two."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from search.config import SearchConfig, compose
from search.recipe import Recipe
from search.run import ledger as lg
from search.run.driver import Driver
from search.run.executors import SerialExecutor
from search.run.launch import open_search_study, worker_setup
from search.run.space import Space
from tests.search.simulated import simulated

FAKE = ["models.base=/m/base", "models.experts=[/m/a,/m/b,/m/c]", "models.build_demo=false",
        "parallel=serial", "pruner=none", "evaluator.stages=[1.0]", "study_name=driver"]
STOCK = {"merge_method": "model_stock", "base_model": "/m/base",
         "models": [{"model": "/m/a"}, {"model": "/m/b"}, {"model": "/m/c"}]}


def _cfg(run_dir: Path, *extra: str) -> SearchConfig:
    return compose([f"run_dir={run_dir}", *FAKE, *extra])


def _search(cfg: SearchConfig, study: optuna.Study | None = None) -> tuple[optuna.Study, Any]:
    space = Space.build(cfg.space, cfg.models.base, cfg.models.experts, cfg.seed)
    study = study or open_search_study(cfg)
    ex = SerialExecutor(simulated(worker_setup(cfg)))
    try:
        summary = Driver(cfg, study, space, ex, show_progress=False).run()
    finally:
        ex.close()
    return study, summary


@pytest.mark.parametrize(("sampler", "space"), [("tpe", "all"), ("cmaes", "ties")])
def test_search_and_resume_store_what_ran(tmp_path: Path, sampler: str, space: str) -> None:
    """Every stored trial carries the parameters that produced its recipe; a resumed run
    continues the same count."""
    if sampler == "cmaes":
        pytest.importorskip("cmaes")
    cfg = _cfg(tmp_path, f"sampler={sampler}", f"space={space}", "n_trials=16")
    _search(cfg)
    study, _ = _search(dataclasses.replace(cfg, n_trials=26))
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 26 and all(t.state == TrialState.COMPLETE for t in trials)
    spc = Space.build(cfg.space, cfg.models.base, cfg.models.experts, cfg.seed)
    sampled = [t for t in trials if "baseline" not in t.user_attrs]
    assert len(sampled) >= 10
    for t in trials:
        recipe = Recipe.from_dict(t.user_attrs["recipe"])
        assert t.user_attrs["driver"]
        if "duplicate_of" not in t.user_attrs:
            assert t.user_attrs["scores"]["final"] is True
        expected = spc.params_for(recipe) or {}
        assert set(t.params) == set(expected), t.number
        for name, value in expected.items():
            assert t.params[name] == pytest.approx(value), (t.number, name)
    if sampler == "cmaes":  # CMA-ES keeps its state in the stored trials' system attrs
        assert any(any(k.startswith("cma:") for k in t.system_attrs) for t in sampled)


def test_a_recipe_in_flight_is_evaluated_once(tmp_path: Path) -> None:
    """Every proposal of a parameter-free space is the same recipe: the first is
    evaluated, the one proposed while it runs waits for it, all others are duplicates."""
    cfg = _cfg(tmp_path, "space.methods=[model_stock]", "baselines=false", "n_trials=5")
    study, summary = _search(cfg)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    assert [t.number for t in trials if "duplicate_of" not in t.user_attrs] == [0]
    assert {t.user_attrs.get("duplicate_of") for t in trials[1:]} == {0}
    assert (summary.evaluated, summary.reused) == (1, 4)


def test_a_trial_asked_beyond_the_budget_beside_another_driver_is_given_back(
        tmp_path: Path) -> None:
    """Another live driver asks the last trial of the budget just before this one: its
    trial has the lower number, so this driver's is the one too many. It is failed as
    surplus before it reaches a worker, and the study ends with exactly the budget."""
    cfg = _cfg(tmp_path, "n_trials=8", "baselines=false")
    other_id = "otherhost:4242:abcdef"  # another machine: alive while its beat is fresh
    study = open_search_study(cfg)
    study.set_user_attr(f"driver.{other_id}", {"start": time.time(), "beat": time.time()})
    other = optuna.load_study(study_name=cfg.study_name, storage=cfg.storage.url)
    theirs: list[optuna.trial.Trial] = []
    ask = study.ask

    def ask_beside_the_other(*a: Any, **k: Any) -> optuna.trial.Trial:
        if len(study.get_trials(deepcopy=False)) == cfg.n_trials - 1 and not theirs:
            theirs.append(other.ask())  # the other driver asks the last one first
            theirs[0].set_user_attr("driver", other_id)
            theirs[0].set_user_attr("recipe", STOCK)
            threading.Timer(1.0, lambda: other.tell(theirs[0], 0.5)).start()
        return ask(*a, **k)

    study.ask = ask_beside_the_other  # type: ignore[method-assign]
    _, summary = _search(cfg, study)
    trials = study.get_trials(deepcopy=False)
    surplus = [t for t in trials if t.user_attrs.get("surplus")]
    assert len(surplus) == 1 and surplus[0].state == TrialState.FAIL
    assert surplus[0].number > theirs[0].number
    assert "scores" not in surplus[0].user_attrs  # never evaluated
    assert summary.counts["done"] == cfg.n_trials
    assert sum(t.state == TrialState.COMPLETE for t in trials) == cfg.n_trials


def _trial(number: int, state: TrialState, recipe: dict[str, Any] | None = None,
           age_s: float = 0.0) -> optuna.trial.FrozenTrial:
    t = create_trial(state=state, value=0.5 if state == TrialState.COMPLETE else None,
                     user_attrs={} if recipe is None else {"recipe": recipe})
    t.number = number
    if t.datetime_start is not None:
        t.datetime_start = t.datetime_start.fromtimestamp(time.time() - age_s)
    return t


def test_surplus_counts_finished_trials_and_those_ahead() -> None:
    done = [_trial(i, TrialState.COMPLETE) for i in range(3)]
    requeued = _trial(3, TrialState.FAIL)
    requeued.user_attrs["requeued"] = True
    ahead = [_trial(5, TrialState.RUNNING), _trial(6, TrialState.WAITING)]
    behind = _trial(9, TrialState.RUNNING)
    trials = [*done, requeued, *ahead, behind]
    assert not lg.surplus(trials, 7, n_trials=6)  # 3 done + 2 ahead: room for one
    assert lg.surplus(trials, 7, n_trials=5)
    assert lg.surplus(trials, 10, n_trials=6)  # 9 is ahead of 10


def test_a_recipe_ahead_blocks_and_one_not_stored_yet_blocks_briefly() -> None:
    h = Recipe.from_dict(STOCK).hash()
    other = {**STOCK, "merge_method": "linear",
             "models": [{"model": "/m/a", "parameters": {"weight": 1.0}}]}
    assert lg.blocked([_trial(2, TrialState.RUNNING, STOCK)], 5, h)
    assert not lg.blocked([_trial(7, TrialState.RUNNING, STOCK)], 5, h)  # behind: waits for us
    assert not lg.blocked([_trial(2, TrialState.COMPLETE, STOCK)], 5, h)  # the dedup table's
    assert not lg.blocked([_trial(2, TrialState.RUNNING, other)], 5, h)
    assert lg.blocked([_trial(2, TrialState.RUNNING)], 5, h)  # still being sampled
    assert not lg.blocked([_trial(2, TrialState.RUNNING, age_s=lg.RECIPE_WAIT_S + 1)], 5, h)


def test_probes_are_enqueued_after_the_baselines_once(tmp_path: Path) -> None:
    """space.probes: each method but linear (whose probe is the uniform soup) is tried at
    its probe point right after the baselines, once per study, with its parameters."""
    cfg = _cfg(tmp_path, "space.probes=true", "space.shared=true", "n_trials=20",
               "space.methods=[linear,task_arithmetic,ties,model_stock]")
    study, _ = _search(cfg)
    probes = [t for t in study.trials if t.user_attrs.get("baseline") == "probe"]
    assert [t.user_attrs["recipe"]["merge_method"] for t in probes] == \
        ["task_arithmetic", "ties", "model_stock"]
    assert all(t.state.name == "COMPLETE" for t in probes)
    assert probes[0].params["lambda"] == 1.0 and probes[0].params["weight.a"] == 1.0
    first_sampled = min(t.number for t in study.trials if "baseline" not in t.user_attrs)
    assert max(t.number for t in probes) < first_sampled

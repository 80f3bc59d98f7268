"""The sampler's in-memory mirror: one write per new trial, storage stays the truth.

The driver runs here with simulated workers (a score computed from the recipe, no
models), so whole searches and resumes take a second or two.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from search.config import SearchConfig, compose
from search.recipe import Recipe
from search.run.driver import Driver
from search.run.executors import SerialExecutor
from search.run.launch import open_search_study, worker_setup
from search.run.space import Space
from search.study.mirror import Mirror
from search.study.writer import open_writer

FAKE = ["models.base=/m/base", "models.experts=[/m/a,/m/b,/m/c]", "models.build_demo=false",
        "parallel=serial", "pruner=none", "evaluator.stages=[1.0]", "study_name=mirror"]


def _cfg(run_dir: Path, *extra: str) -> SearchConfig:
    return compose([f"run_dir={run_dir}", *FAKE, *extra])


def _search(cfg: SearchConfig) -> optuna.Study:
    space = Space.build(cfg.space, cfg.models.base, cfg.models.experts, cfg.seed)
    study = open_search_study(cfg, space)
    ex = SerialExecutor(dataclasses.replace(worker_setup(cfg), simulate_s=0.0))
    try:
        Driver(cfg, study, space, ex, show_progress=False).run()
    finally:
        ex.close()
    return study


@pytest.mark.parametrize(("sampler", "space"), [("tpe", "all"), ("cmaes", "ties")])
def test_search_and_resume_store_what_ran(tmp_path: Path, sampler: str, space: str) -> None:
    """Every stored trial carries the parameters that produced its recipe; a resumed run
    rebuilds the mirror from storage and continues the same count."""
    cfg = _cfg(tmp_path, f"sampler={sampler}", f"space={space}", "n_trials=16")
    _search(cfg)
    study = _search(dataclasses.replace(cfg, n_trials=26))
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 26
    assert all(t.state == TrialState.COMPLETE for t in trials)
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
    # TPE's constant-liar attribute is the mirror's business: not written to storage
    assert not any(k.startswith("tpe:") for t in trials for k in t.system_attrs)


def test_enqueued_trial_is_claimed_by_one_mirror(tmp_path: Path) -> None:
    """Two drivers' mirrors on one SQLite study: an enqueued trial goes to exactly one."""
    url = f"sqlite:///{tmp_path}/s.db"
    a = optuna.create_study(storage=url, study_name="s", direction="maximize")
    b = optuna.load_study(storage=url, study_name="s")
    a.enqueue_trial({"x": 0.25}, user_attrs={"recipe": {"k": 1}})
    ma, mb = Mirror(a), Mirror(b)
    first, second = ma.pop_waiting(), mb.pop_waiting()
    assert first is not None and second is None
    assert first.state == TrialState.RUNNING and first.user_attrs["recipe"] == {"k": 1}
    mem = ma.ask(first)
    assert mem is not None
    mem.suggest_float("x", 0.0, 1.0)
    assert mem.params == {"x": 0.25}
    ticket = ma.start(mem, {"driver": "me"}, first)
    ma.finish(ticket, TrialState.COMPLETE, [0.5], {"scores": {"objective": 0.5}})
    stored = b.get_trials(deepcopy=False)[0]
    assert stored.state == TrialState.COMPLETE and stored.value == 0.5
    assert stored.params == {"x": 0.25}
    assert stored.user_attrs == {"recipe": {"k": 1}, "driver": "me",
                                 "scores": {"objective": 0.5}}
    mb.take_in(b.get_trials(deepcopy=False))  # the other driver's sampler learns it
    assert [t.params for t in mb.mem.get_trials()] == [{"x": 0.25}]


def test_new_trial_is_one_write_and_mirror_learns_outcomes(tmp_path: Path) -> None:
    """start() creates the RUNNING trial with its parameters and attributes at once;
    trials without parameters never reach the sampler."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db", direction="maximize")
    mirror = Mirror(study)
    mem = mirror.ask(None)
    assert mem is not None
    mem.suggest_float("x", 0.0, 1.0)
    ticket = mirror.start(mem, {"driver": "me", "recipe": {"r": 1}}, None)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    assert ticket.number is None  # read only when needed
    assert [t.number for t in running] == [mirror.number(ticket)]
    assert running[0].params == mem.params and running[0].user_attrs["recipe"] == {"r": 1}
    mirror.finish(ticket, TrialState.FAIL, None, {"error": "ValueError: boom"}, defer=True)
    assert mirror.mem.get_trials()[0].state == TrialState.FAIL  # the sampler knows at once
    assert study.get_trials()[0].state == TrialState.RUNNING  # storage after flush()
    mirror.flush()
    assert study.get_trials()[0].user_attrs["error"] == "ValueError: boom"
    # a trial from storage without parameters (a baseline outside the space) is skipped
    study.add_trial(optuna.trial.create_trial(value=0.9, user_attrs={"baseline": "base"}))
    fresh = Mirror(study)
    fresh.take_in(study.get_trials(deepcopy=False))
    assert fresh.mem.get_trials() == []


def test_a_trial_asked_beyond_the_budget_beside_another_driver_is_given_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another live driver asks the last trial of the budget at the same moment as this
    one: its trial is stored first (lower number), so this driver's trial is the one too
    many. It is failed as surplus before it reaches a worker, and the study ends with
    exactly the budget done."""
    cfg = _cfg(tmp_path, "n_trials=8", "baselines=false")
    other_id = "otherhost:4242:abcdef"  # another machine: alive while its beat is fresh
    space = Space.build(cfg.space, cfg.models.base, cfg.models.experts, cfg.seed)
    study = open_search_study(cfg, space)
    study.set_user_attr(f"driver.{other_id}", {"start": time.time(), "beat": time.time()})
    other = optuna.load_study(study_name=cfg.study_name, storage=cfg.storage.url)
    theirs: list[optuna.trial.Trial] = []
    starts: list[int] = []
    start = Mirror.start

    def start_beside_the_other(self: Mirror, mem: Any, attrs: Any, claimed: Any) -> Any:
        starts.append(1)
        if len(starts) == cfg.n_trials:  # the other driver asks the last one meanwhile
            theirs.append(other.ask())
            theirs[0].set_user_attr("driver", other_id)
            threading.Timer(1.0, lambda: other.tell(theirs[0], 0.5)).start()
        return start(self, mem, attrs, claimed)

    monkeypatch.setattr(Mirror, "start", start_beside_the_other)
    ex = SerialExecutor(dataclasses.replace(worker_setup(cfg), simulate_s=0.0))
    try:
        summary = Driver(cfg, study, space, ex, show_progress=False).run()
    finally:
        ex.close()
    trials = study.get_trials(deepcopy=False)
    surplus = [t for t in trials if t.user_attrs.get("surplus")]
    assert len(surplus) == 1 and surplus[0].state == TrialState.FAIL
    assert surplus[0].number > theirs[0].number
    assert "scores" not in surplus[0].user_attrs  # never evaluated
    assert summary.counts["done"] == cfg.n_trials
    assert sum(t.state == TrialState.COMPLETE for t in trials) == cfg.n_trials


def test_counts_without_waiting_for_the_writer_are_exact(tmp_path: Path) -> None:
    """The periodic re-read does not wait for the writer: the trials it sent but the
    read does not hold count as asked, and the ones the read holds are not counted twice
    (a double count made the driver idle half a second with workers free)."""
    url = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(storage=url, study_name="s", direction="maximize")
    mirror = Mirror(study, open_writer(url, study._storage))
    try:
        for _ in range(4):
            mem = mirror.ask(None)
            assert mem is not None
            mem.suggest_float("x", 0.0, 1.0)
            mirror.start(mem, {"driver": "me"}, None)
        keys = mirror.unwritten()
        before: list[optuna.trial.FrozenTrial] = []  # a read from before the writes

        def mine(t: optuna.trial.FrozenTrial) -> bool:
            return t.user_attrs.get("driver") == "me"

        assert mirror.missing(keys, before, mine) == 4
        mirror.sync()
        after = study.get_trials(deepcopy=False)
        assert len(after) == 4
        assert mirror.missing(keys, after, mine) == 0
        assert mirror.missing(keys, after[:1], mine) == 3
    finally:
        mirror.close()

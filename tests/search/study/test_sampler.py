"""ConditionalTPESampler: Optuna's grouped TPE, sampling only the groups a trial uses."""

from __future__ import annotations

import json
import random
import warnings
from typing import Any

import optuna
import pytest
from optuna.search_space.group_decomposed import _GroupDecomposedSearchSpace
from optuna.trial import TrialState

from search.config import SpaceConfig
from search.run.space import METHOD_KEY, Space
from search.study.sampler import ConditionalTPESampler

BASE = "/models/base"
EXPERTS = ("/models/e1", "/models/e2", "/models/e3")


@pytest.fixture(autouse=True)
def _quiet() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _tpe(cls: type = ConditionalTPESampler, **kwargs: Any) -> optuna.samplers.TPESampler:
    args = {"seed": 3, "multivariate": True, "group": True, "n_startup_trials": 10}
    return cls(**{**args, **kwargs})


def _fill(study: optuna.Study, space: Space, n: int, seed: int = 0) -> None:
    """``n`` finished trials from random proposals (a scored history for TPE to fit)."""
    rnd = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    rng = random.Random(seed)
    for _ in range(n):
        t = rnd.ask()
        space.suggest(t)
        rnd.tell(t, rng.random())
    study.add_trials(rnd.get_trials(deepcopy=False))


def _space(*methods: str) -> Space:
    return Space.build(SpaceConfig(methods=methods), BASE, EXPERTS)


def _run(sampler: optuna.samplers.BaseSampler, space: Space, n: int,
         history: int = 40) -> list[dict[str, Any]]:
    study = optuna.create_study(sampler=sampler)
    _fill(study, space, history)
    out = []
    for i in range(n):
        t = study.ask()
        space.suggest(t)
        out.append(dict(t.params))
        study.tell(t, (i * 0.37) % 1.0)
    return out


def test_samples_only_the_chosen_methods_group() -> None:
    """Over several methods, a proposal fits the method choice and the chosen method's
    parameters, not every method's; every parameter it then uses was sampled jointly."""
    space = _space("linear", "ties", "dare_ties", "slerp")
    sampler = _tpe()
    study = optuna.create_study(sampler=sampler)
    _fill(study, space, 60)
    fitted: list[set[str]] = []
    real = sampler._sample_relative

    def spy(st: optuna.Study, trial: Any, sub: dict[str, Any]) -> dict[str, Any]:
        fitted.append(set(sub))
        return real(st, trial, sub)

    sampler._sample_relative = spy  # type: ignore[method-assign]
    for _ in range(8):
        fitted.clear()
        t = study.ask()
        space.suggest(t)
        method = t.params[METHOD_KEY]
        assert fitted[0] == {METHOD_KEY}
        own = {k for k in t.params if k != METHOD_KEY}
        assert set().union(*fitted[1:]) == own, (method, fitted)
        assert all(k.startswith(f"{method}.") for k in own)
        assert set(t.relative_params) == set(t.params)  # nothing fell back to univariate
        study.tell(t, 0.5)
    # the stock sampler fits one model per method on every proposal
    stock = _tpe(optuna.samplers.TPESampler)
    study2 = optuna.create_study(sampler=stock)
    _fill(study2, space, 60)
    n_groups = len(_GroupDecomposedSearchSpace(True).calculate(study2).search_spaces)
    assert n_groups == 1 + 4


def test_single_method_matches_stock_tpe_exactly() -> None:
    """With no categorical choice to condition on, every group is sampled, in the stock
    order: the same seed gives the same proposals as Optuna's TPESampler."""
    space = _space("ties")
    ours = _run(_tpe(), space, 12)
    stock = _run(_tpe(optuna.samplers.TPESampler), space, 12)
    assert ours == stock
    assert len({tuple(sorted(p.items())) for p in ours}) == 12


def test_single_method_with_running_trials_matches_stock_tpe_exactly() -> None:
    """The same with constant_liar and three trials always in flight (their shared relative
    parameters count as poor results): identical proposals, every one different."""

    def run(cls: type) -> list[dict[str, Any]]:
        study = optuna.create_study(sampler=_tpe(cls, constant_liar=True))
        space = _space("ties")
        _fill(study, space, 40)
        pending, out = [], []
        for i in range(15):
            t = study.ask()
            space.suggest(t)
            out.append(dict(t.params))
            pending.append(t)
            if len(pending) == 3:
                study.tell(pending.pop(0), (i * 0.37) % 1.0)
        return out

    ours = run(ConditionalTPESampler)
    assert ours == run(optuna.samplers.TPESampler)
    assert len({tuple(sorted(p.items())) for p in ours}) == 15


def test_seeded_runs_repeat_and_seeds_differ() -> None:
    space = _space("linear", "ties", "slerp")
    a = _run(_tpe(seed=5), space, 10)
    assert a == _run(_tpe(seed=5), space, 10)
    assert a != _run(_tpe(seed=6), space, 10)


def test_incremental_groups_equal_a_full_recompute() -> None:
    """The groups updated trial by trial are the groups computed from all trials, also
    after pruned and failed trials and trials added from outside (another driver)."""
    space = _space("linear", "task_arithmetic", "ties", "breadcrumbs")
    sampler = _tpe()
    study = optuna.create_study(sampler=sampler)
    _fill(study, space, 15)
    for i in range(25):
        t = study.ask()
        space.suggest(t)
        state = (TrialState.PRUNED, TrialState.FAIL, TrialState.COMPLETE)[i % 3]
        if state == TrialState.COMPLETE:
            study.tell(t, 0.3)
        else:
            study.tell(t, state=state)
        if i % 10 == 0:
            _fill(study, space, 3, seed=100 + i)

    def canon(groups: list[dict[str, Any]]) -> list[tuple[str, ...]]:
        return sorted(tuple(sorted(g)) for g in groups)

    space.suggest(study.ask())  # the groups are brought up to date by a proposal
    full = _GroupDecomposedSearchSpace(True).calculate(study).search_spaces
    assert canon(sampler._groups.search_spaces) == canon(full)
    finished = [t for t in study.get_trials() if t.state.is_finished()
                and t.state != TrialState.FAIL]
    assert sampler._n_with_params == len(finished)


def test_a_new_study_starts_from_scratch() -> None:
    """In-memory studies all have id 0: the sampler must not carry groups across."""
    sampler = _tpe()
    s1 = optuna.create_study(sampler=sampler)
    _fill(s1, _space("linear", "ties"), 20)
    s1.ask()
    s2 = optuna.create_study(sampler=sampler)
    _fill(s2, _space("slerp"), 20)
    t = s2.ask()
    assert all(k.startswith("slerp.") for k in t.relative_params)
    names = set().union(*sampler._groups.search_spaces)
    assert names and all(k.startswith("slerp.") for k in names)


def test_constant_liar_shares_running_trials_relative_params() -> None:
    """As the stock sampler: a running trial's relative parameters are stored on it, so
    the next proposal counts it (parallel workers are not sent the same point)."""
    space = _space("linear", "ties")
    sampler = _tpe(constant_liar=True)
    study = optuna.create_study(sampler=sampler)
    _fill(study, space, 30)
    running = study.ask()
    space.suggest(running)
    attrs = study._storage.get_trial(running._trial_id).system_attrs
    stored = json.loads(attrs["tpe:relative_params:0"])
    assert stored == running.relative_params
    assert set(stored) == set(running.params)  # the method and its own parameters only


def test_enqueued_choice_and_unseen_choice_get_their_groups() -> None:
    """An enqueued trial that fixes the method gets that method's parameters sampled
    jointly; a method no finished trial used yet gets every group (none is skipped)."""
    space = _space("linear", "ties", "slerp")
    sampler = _tpe()
    study = optuna.create_study(sampler=sampler)
    rnd = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(40):  # a history with linear and ties trials only
        t = rnd.ask()
        rec = space.suggest(t)
        if rec.merge_method == "slerp":
            rnd.tell(t, state=TrialState.FAIL)
        else:
            rnd.tell(t, 0.5)
    study.add_trials([t for t in rnd.get_trials() if t.state == TrialState.COMPLETE])
    study.enqueue_trial({METHOD_KEY: "ties"})
    t = study.ask()
    space.suggest(t)
    assert t.params[METHOD_KEY] == "ties"
    assert {k for k in t.params if k != METHOD_KEY} <= set(t.relative_params)
    study.tell(t, 0.5)
    study.enqueue_trial({METHOD_KEY: "slerp"})
    t = study.ask()
    space.suggest(t)
    assert t.params[METHOD_KEY] == "slerp"
    assert any(k.startswith("ties.") for k in t.relative_params)  # all groups drawn


def test_without_group_it_is_the_stock_sampler() -> None:
    space = _space("linear", "ties")
    ours = _run(_tpe(group=False), space, 8)
    stock = _run(_tpe(optuna.samplers.TPESampler, group=False), space, 8)
    assert ours == stock


def test_finds_good_merges_on_a_conditional_toy_problem() -> None:
    """A toy score over (method, weights): the sampler concentrates on the best method
    and improves on random search with the same budget (both seeded)."""
    space = _space("linear", "ties", "slerp")

    def score(p: dict[str, Any]) -> float:
        bonus = {"ties": 0.5, "linear": 0.2, "slerp": 0.0}[p[METHOD_KEY]]
        w = [v for k, v in p.items() if ".weight" in k]
        return bonus - sum((x - 0.7) ** 2 for x in w) / max(len(w), 1)

    def best(sampler: optuna.samplers.BaseSampler) -> tuple[float, int]:
        study = optuna.create_study(direction="maximize", sampler=sampler)
        for _ in range(80):
            t = study.ask()
            space.suggest(t)
            study.tell(t, score(t.params))
        late = [t.params[METHOD_KEY] for t in study.trials[-30:]]
        return study.best_value, late.count("ties")

    tpe_best, tpe_ties = best(_tpe(seed=1))
    rnd_best, rnd_ties = best(optuna.samplers.RandomSampler(seed=1))
    assert tpe_best > rnd_best
    assert tpe_ties > rnd_ties and tpe_ties >= 20


def test_the_old_target_path_still_builds_the_sampler() -> None:
    """Saved run folders name ``search.sampling.ConditionalTPESampler``: it must resume."""
    from search.config import ComponentConfig
    from search.run.launch import instantiate
    from search.study.sampler import ConditionalTPESampler

    old = instantiate(ComponentConfig("search.sampling.ConditionalTPESampler", {"seed": 1}),
                      "sampler")
    assert type(old) is ConditionalTPESampler

"""Baselines and seed recipes in the study: enqueued first, the greedy soup step by step.

The leader (the live driver registered first) enqueues the baselines and the user's
seed recipes once per study, then the greedy soup's next step whenever the last one is
scored, and records the finished greedy soup in the study's attributes. Any driver
evaluates the enqueued trials: ``study.ask()`` hands each to exactly one.

Example:
    >>> seeding = Seeding(cfg, study, space, ledger, me)       # doctest: +SKIP
    >>> seeding.seed_study(); seeding.advance()               # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
from optuna.trial import TrialState

from search import study as st
from search.config import SearchConfig
from search.recipe import Recipe
from search.run import baselines as bl
from search.run.ledger import Ledger, recipe_hash
from search.run.space import Space
from search.study.liveness import leader

log = logging.getLogger(__name__)


class Seeding:
    """Enqueues the baselines, seeds and greedy-soup steps of one study (as the leader,
    driver ``me``), each with its parameters in ``space``, steps from ``ledger``'s scores."""

    def __init__(self, cfg: SearchConfig, study: optuna.Study, space: Space, ledger: Ledger,
                 me: str) -> None:
        self.cfg, self.study, self.space, self.ledger, self.me = cfg, study, space, ledger, me
        self.done = not cfg.baselines  # the greedy soup is finished (or not wanted)

    def leader(self) -> bool:
        return leader(self.study.user_attrs, self.cfg.stale_after_s) == self.me

    def may_sample(self) -> bool:
        """The sampler may propose once the baselines are done (or none is waiting)."""
        return self.done or bool(self.study.get_trials(deepcopy=False,
                                                       states=(TrialState.WAITING,)))

    def _enqueue(self, recipe: Recipe, tag: str, **extra: Any) -> None:
        params = self.space.params_for(recipe) or {}
        self.study.enqueue_trial(params, user_attrs={st.ATTR_RECIPE: recipe.to_dict(),
                                                     st.ATTR_BASELINE: tag, **extra},
                                 skip_if_exists=False)

    def seed_study(self) -> None:
        """Enqueues the baselines and the user's seed recipes, once per study."""
        if not (self.cfg.baselines or self.cfg.seeds) or \
                self.study.user_attrs.get("baselines.enqueued") or not self.leader():
            return  # the first live driver seeds the study
        m = self.cfg.models
        seeds = bl.load_seeds(self.cfg.seeds, (m.base, *m.experts))  # a bad seed: no write
        self.study.set_user_attr("baselines.enqueued", True)
        if self.cfg.baselines:
            initial = bl.initial(m.base, m.experts, self.space.cfg.dtype)
            for tag, recipe in initial:
                self._enqueue(recipe, tag)
            known = {r.hash() for _, r in initial}
            for recipe in self.space.probes() if self.space.cfg.probes else ():
                if recipe.hash() not in known:  # linear's probe is the uniform soup
                    self._enqueue(recipe, bl.PROBE)
        for path, recipe in seeds:
            if self.space.params_for(recipe) is None:
                log.warning("seed %s: %s with these values is outside the searched space; it "
                            "is evaluated as a reference point (like a baseline), but the "
                            "sampler cannot build on its values", path, recipe.merge_method)
            self._enqueue(recipe, bl.SEED, seed_file=path)

    def advance(self) -> None:
        """Enqueues the next greedy-soup step, or records the finished greedy soup."""
        if self.done:
            return
        if self.study.user_attrs.get("baselines.greedy") is not None:
            self.done = True
            return
        if not self.leader():
            return
        m = self.cfg.models
        state = bl.greedy_step(list(m.experts), self.ledger.score_of, self.space.cfg.dtype)
        if state.done and state.recipe is not None:
            self.study.set_user_attr("baselines.greedy", {
                "trial": self.ledger.number_of(state.recipe.hash()),
                "recipe_hash": state.recipe.hash(), "score": state.score,
                "ingredients": list(state.ingredients)})
            uniform = bl.soup(list(m.experts), self.space.cfg.dtype).hash()
            self.study.set_user_attr("baselines.uniform", self.ledger.number_of(uniform))
            self.done = True
            return
        if state.next is None:
            return  # parents still running
        h = state.next.hash()
        # COMPLETE too: another driver may have scored this step since our last read.
        queued = self.study.get_trials(deepcopy=False, states=(
            TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE))
        if not any(recipe_hash(t) == h for t in queued):
            self._enqueue(state.next, bl.GREEDY_STEP)

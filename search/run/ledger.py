"""The driver's view of the study: the budget count, the recipes already scored, and the
two checks that keep several drivers on one study exact without locks.

Both checks order trials by number. Optuna numbers a trial when it creates it (asked,
or enqueued as WAITING), and the trial is in storage from then on, so a driver that
reads the study after creating its trial sees every trial with a lower number:

- **the budget** (:func:`surplus`): a trial is evaluated only while the finished trials
  plus the trials ahead of it (lower numbers, running or waiting) leave room for it;
  otherwise it is given back, never evaluated. Of two drivers asking the last trial at
  the same moment, the later trial is the one too many, and both drivers agree.
- **one evaluation per recipe** (:func:`blocked`): a trial whose recipe a running trial
  ahead of it already evaluates waits for that one and completes as its duplicate. A
  trial ahead whose recipe is not stored yet (its driver is still sampling it) blocks
  for a moment too, as it may turn out to be the same recipe.

Example:
    >>> ledger = Ledger()
    >>> ledger.used(), ledger.best()
    (0, None)
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from optuna.trial import FrozenTrial, Trial, TrialState

from search.errors import SoupError
from search.recipe import Recipe
from search.study import ATTR_RECIPE, ATTR_REQUEUED, ATTR_SCORES, counts
from search.study.trials import started_at

RECIPE_WAIT_S = 10.0  # a trial ahead without its recipe after this long has lost its driver
_AHEAD = (TrialState.RUNNING, TrialState.WAITING)


def recipe_hash(t: FrozenTrial | Trial) -> str | None:
    """The canonical hash of a trial's stored recipe; None when it has none (yet) or one
    that does not parse."""
    recipe = t.user_attrs.get(ATTR_RECIPE)
    if recipe is None:
        return None
    try:
        return Recipe.from_dict(recipe).hash()
    except SoupError:
        return None


@dataclass
class Ledger:
    """Counts and scores read from storage, plus what this driver did since.

    Attributes:
        scored: recipe hash -> (number of the trial that scored it, values, objective).
        failed: hashes of recipes whose trial failed (not a retry, not given back).
        counts: :func:`search.study.counts` of the last read.
        asked: trials this driver asked since the last read.
    """

    scored: dict[str, tuple[int, list[float], float]] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=lambda: counts([]))
    asked: int = 0
    _seen: set[int] = field(default_factory=set)

    def take(self, trials: Sequence[FrozenTrial]) -> dict[str, int]:
        """Folds a fresh read of every trial in; returns its counts."""
        for t in trials:
            if t.number in self._seen or not t.state.is_finished():
                continue
            self._seen.add(t.number)
            h = recipe_hash(t)
            if h is None:
                continue
            if t.state == TrialState.COMPLETE and t.values is not None:
                obj = (t.user_attrs.get(ATTR_SCORES) or {}).get("objective", t.values[0])
                self.add(h, t.number, list(t.values), float(obj))
            elif t.state == TrialState.FAIL and not t.user_attrs.get(ATTR_REQUEUED) \
                    and not t.user_attrs.get("surplus"):
                self.failed.add(h)
        self.counts, self.asked = counts(trials), 0
        return self.counts

    def add(self, h: str, number: int, values: list[float], objective: float) -> None:
        """Records a scored recipe (the first trial that scored it stays its reference)."""
        self.scored.setdefault(h, (number, values, objective))

    def used(self) -> int:
        """Trials counted against the budget: finished, running, and asked since the read."""
        return self.counts["done"] + self.counts["running"] + self.asked

    def best(self) -> float | None:
        return max((o for _, _, o in self.scored.values()), default=None)

    def score_of(self, recipe: Recipe) -> float | None:
        """A recipe's objective; ``-inf`` if it failed; None while it is not scored."""
        h = recipe.hash()
        if h in self.scored:
            return self.scored[h][2]
        return -math.inf if h in self.failed else None

    def number_of(self, h: str) -> int | None:
        return self.scored[h][0] if h in self.scored else None


def surplus(trials: Sequence[FrozenTrial], number: int, n_trials: int) -> bool:
    """Whether trial ``number`` is over the budget ``n_trials``: the finished trials and
    the running or waiting trials ahead of it (lower numbers) use all of it."""
    ahead = sum(1 for t in trials if t.number < number and t.state in _AHEAD)
    return counts(trials)["done"] + ahead >= n_trials


def blocked(trials: Sequence[FrozenTrial], number: int, h: str,
            now: float | None = None) -> bool:
    """Whether trial ``number`` (recipe ``h``) must wait: a running trial ahead of it
    evaluates ``h``, or has no recipe yet and was asked under :data:`RECIPE_WAIT_S` ago."""
    now = time.time() if now is None else now
    ahead = (t for t in trials if t.number < number and t.state == TrialState.RUNNING)
    return any(recipe_hash(t) == h or (ATTR_RECIPE not in t.user_attrs
                                       and now - started_at(t) < RECIPE_WAIT_S) for t in ahead)

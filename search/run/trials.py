"""One trial through Optuna's ask/tell API: its recipe, and how it ends.

Example:
    >>> recipe, error = trial_recipe(space, study.ask())         # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import Trial, TrialState

from search.errors import SoupError, one_line
from search.merge.methods import validate_recipe
from search.recipe import Recipe
from search.run.space import Space
from search.study import ATTR_RECIPE

log = logging.getLogger(__name__)


def trial_recipe(space: Space, trial: Trial) -> tuple[Recipe | None, str]:
    """The trial's recipe, sampled or the one it was enqueued with, or the error (one
    line). An enqueued recipe the space expresses is suggested too, so the sampler learns
    from its values; one outside the space leaves the trial without parameters."""
    fixed = trial.user_attrs.get(ATTR_RECIPE)
    try:
        if fixed is None:
            recipe = space.suggest(trial)
        else:
            recipe = Recipe.from_dict(fixed)
            if space.params_for(recipe) is not None:
                space.suggest(trial)
        validate_recipe(recipe)
    except SoupError as exc:
        return None, one_line(exc, with_type=True)
    return recipe, ""


def tell(study: optuna.Study, trial: Trial, values: list[float] | None,
         state: TrialState | None = None) -> None:
    """``study.tell``; a trial another driver finished meanwhile (it took this driver
    for dead) is left as it is, with a warning."""
    try:
        study.tell(trial, values, state=state)
    except UpdateFinishedTrialError as exc:
        log.warning("trial %d: %s", trial.number, one_line(exc))


def give_back(study: optuna.Study, trial: Trial, enqueued: dict[str, Any]) -> None:
    """Fails a trial over the budget as ``surplus``, never evaluated; an enqueued one
    (``enqueued``: its attributes when it was asked) goes back to the queue."""
    trial.set_user_attr("surplus", True)
    tell(study, trial, None, TrialState.FAIL)
    if ATTR_RECIPE in enqueued:
        study.enqueue_trial(dict(trial.params), user_attrs=enqueued, skip_if_exists=False)

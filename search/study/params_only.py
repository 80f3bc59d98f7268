"""Optuna samplers that infer their search space from trials with parameters only.

Baselines and seed recipes the searched space cannot express (the uniform soup when
``space=ties``, say) are stored as trials without parameters, so that the leaderboard
shows them. Optuna's intersection search space (CMA-ES, GP, NSGA-II) is the set of
parameters every finished trial has, which one such trial makes empty: the sampler
would then draw every parameter at random. These subclasses infer the space from the
trials that have parameters; everything else is Optuna's own class.

Example (conf/sampler/cmaes.yaml)::

    _target_: search.study.params_only.CmaEsSampler
    seed: ${seed}
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any, cast

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState


class _WithParams:
    """A read-only view of a study whose finished trials all have parameters."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None,
                    use_cache: bool = False) -> list[FrozenTrial]:
        trials = self._study._get_trials(deepcopy, states, use_cache)
        return [t for t in trials if t.distributions or not t.state.is_finished()]

    def get_trials(self, deepcopy: bool = True,
                   states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy, states)


class _ParamsOnly(optuna.samplers.BaseSampler):
    def infer_relative_search_space(self, study: optuna.Study,
                                    trial: FrozenTrial) -> dict[str, BaseDistribution]:
        view = cast(optuna.Study, _WithParams(study))
        return super().infer_relative_search_space(view, trial)  # type: ignore[safe-super]


class CmaEsSampler(_ParamsOnly, optuna.samplers.CmaEsSampler):
    """``optuna.samplers.CmaEsSampler`` whose search space ignores parameter-less trials."""


class GPSampler(_ParamsOnly, optuna.samplers.GPSampler):
    """``optuna.samplers.GPSampler`` whose search space ignores parameter-less trials."""


class NSGAIISampler(_ParamsOnly, optuna.samplers.NSGAIISampler):
    """``optuna.samplers.NSGAIISampler`` whose search space ignores parameter-less trials."""

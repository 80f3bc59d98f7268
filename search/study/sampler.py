"""TPE for conditional merge spaces: one model per method, sampled only where it is used.

Optuna's ``TPESampler(multivariate=True, group=True)`` splits the search space into groups
of parameters that always occur together (here: the method choice, then each method's
own parameters) and fits one joint Parzen model per group. It does so for every group on
every proposal, although a trial uses only the group of the method it picks, and it
recomputes the groups from every stored trial each time, so its cost per proposal grows
with the number of methods and of stored trials (docs/benchmarks.md, Search, measures
both classes).

:class:`ConditionalTPESampler` keeps Optuna's model and changes only the bookkeeping:

- the groups are updated from the trials finished since the last proposal (finished
  trials never change), not recomputed from all of them;
- the groups shared by every trial (the method choice) are sampled first; of the other
  groups, only those that occurred in trials with the same categorical choices are
  sampled (all of them for a choice no finished trial made yet). Each group is fitted on
  the same split of the finished trials as before; the groups that would have been drawn
  and thrown away are skipped. Should a trial ask for a parameter of a skipped group
  anyway, Optuna samples it with univariate TPE, as it does for any parameter outside
  the relative search space;
- that split (good and poor trials, which does not depend on the group) is computed once
  per proposal, not once per group;
- a finished trial's parameters in the model's internal form are computed once and kept
  (finished trials never change), not on every proposal.

One difference from the stock sampler is intended: with ``constant_liar`` a running trial
counts as a poor result (TPE's "above" set) for the groups it was given values for. The
stock sampler gives every running trial values for every method, so a trial running
method A also weighs against the regions of method B's parameters it happened to draw and
never used; here a running trial weighs only on the values it is actually evaluating.

Seeded runs are reproducible (the random draws differ from the stock sampler's, which
draws for every group). Everything else (``constant_liar``, pruned trials, multiple
objectives, ``reseed_rng``) is the stock sampler's.

Example (conf/sampler/tpe.yaml)::

    _target_: search.study.sampler.ConditionalTPESampler
    seed: ${seed}
    multivariate: true
    group: true
    constant_liar: true
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers._tpe import sampler as _stock
from optuna.search_space.group_decomposed import _SearchSpaceGroup
from optuna.trial import FrozenTrial, TrialState

RELATIVE_PARAMS_KEY: str | None = None
_SYSTEM_ATTR_MAX_LENGTH = 2045

try:  # Optuna >= 4.2 shares the relative parameters of running trials (constant_liar)
    RELATIVE_PARAMS_KEY = _stock._RELATIVE_PARAMS_KEY
    _SYSTEM_ATTR_MAX_LENGTH = _stock._SYSTEM_ATTR_MAX_LENGTH
except AttributeError:  # pragma: no cover - older Optuna reads them from the trial itself
    pass
_split_trials = getattr(_stock, "_split_trials", None)  # None: every group splits anew

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class ConditionalTPESampler(optuna.samplers.TPESampler):
    """``optuna.samplers.TPESampler`` that samples only the parameter groups a trial uses.

    Takes the same arguments as ``TPESampler``. Without ``multivariate=True, group=True``
    it is the stock sampler.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reset(None)
        # (trial id, split or None until the first group needs it) during sample_relative
        self._split_memo: tuple[int, Any] | None = None

    def _reset(self, study_key: tuple[Any, int] | None) -> None:
        self._for_study = study_key
        self._seen: set[int] = set()  # trial ids already folded into the groups
        self._groups = _SearchSpaceGroup()
        self._n_with_params = 0  # finished trials that have parameters
        self._param_count: dict[str, int] = {}  # finished trials holding each parameter
        self._cooccur: dict[tuple[str, str], set[str]] = {}  # (categorical, choice) -> names
        # group's names -> finished trial id -> its values in internal form
        self._internal: dict[tuple[str, ...], dict[int, tuple[float, ...]]] = {}

    def _grouped(self, study: optuna.Study) -> bool:
        if not self._group:
            return False
        check = getattr(self, "_is_multivariate", None)  # Optuna >= 4.2 (multivariate=None)
        return bool(check(study) if check is not None else self._multivariate)

    def _update(self, study: optuna.Study) -> None:
        """Folds the trials finished since the last call into the groups and counts."""
        if self._for_study is None or self._for_study[0] is not study._storage or \
                self._for_study[1] != study._study_id:
            self._reset((study._storage, study._study_id))  # in-memory studies share id 0
        for t in study._get_trials(deepcopy=False, states=_FINISHED, use_cache=True):
            if t._trial_id in self._seen:
                continue
            self._seen.add(t._trial_id)
            if not t.distributions:
                continue
            self._groups.add_distributions(t.distributions)
            self._n_with_params += 1
            names = set(t.distributions)
            for name in names:
                self._param_count[name] = self._param_count.get(name, 0) + 1
            for name, dist in t.distributions.items():
                if isinstance(dist, CategoricalDistribution):
                    self._cooccur.setdefault((name, _choice_key(t.params[name])), set()) \
                        .update(names)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        if not self._grouped(study):
            return super().infer_relative_search_space(study, trial)
        self._update(study)
        # read only by sample_relative below; _update replaces, never edits, the groups
        self._search_space_group = self._groups
        search_space: dict[str, BaseDistribution] = {}
        for sub_space in self._search_space_group.search_spaces:
            for name, dist in sorted(sub_space.items()):  # sorted: hashing is random
                if not dist.single():
                    search_space[name] = dist
        return search_space

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial,
        search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not self._grouped(study) or not search_space:
            return super().sample_relative(study, trial, search_space)
        assert self._search_space_group is not None
        groups = []
        for sub_space in self._search_space_group.search_spaces:
            g = {name: dist for name, dist in sorted(sub_space.items())
                 if not dist.single() and name in search_space}
            if g:
                groups.append(g)
        shared: list[dict[str, BaseDistribution]] = []
        rest: list[dict[str, BaseDistribution]] = []
        for g in groups:
            every = all(self._param_count.get(n, 0) == self._n_with_params for n in g)
            (shared if every else rest).append(g)

        self._split_memo = (trial._trial_id, None)
        try:
            params = self._sample_groups(study, trial, search_space, shared, rest)
        finally:
            self._split_memo = None
        if params and self._constant_liar and RELATIVE_PARAMS_KEY is not None:
            # As the stock sampler: running trials' relative parameters for constant_liar.
            text = json.dumps(params)
            for i in range(0, len(text), _SYSTEM_ATTR_MAX_LENGTH):
                study._storage.set_trial_system_attr(
                    trial._trial_id, f"{RELATIVE_PARAMS_KEY}:{i // _SYSTEM_ATTR_MAX_LENGTH}",
                    text[i:i + _SYSTEM_ATTR_MAX_LENGTH])
        return params

    def _sample_groups(self, study: optuna.Study, trial: FrozenTrial,
                       search_space: dict[str, BaseDistribution],
                       shared: list[dict[str, BaseDistribution]],
                       rest: list[dict[str, BaseDistribution]]) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for g in shared:
            params.update(self._sample_relative(study, trial, g))
        # the choices the trial will make: an enqueued trial's fixed values win
        fixed = trial.system_attrs.get("fixed_params") or {}
        made = {**params, **{k: v for k, v in fixed.items() if k in params}}
        choices = [(n, v) for n, v in made.items()
                   if isinstance(search_space[n], CategoricalDistribution)]
        seen = [self._cooccur.get((n, _choice_key(v)), None) for n, v in choices]
        if choices and None not in seen:
            used = set().union(*(names for names in seen if names))
            rest = [g for g in rest if not used.isdisjoint(g)]
        for g in rest:
            params.update(self._sample_relative(study, trial, g))
        return params

    def _sample(self, study: optuna.Study, trial: FrozenTrial,
                search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        """Optuna's TPE step for one group, on the split shared by this proposal's groups."""
        memo = self._split_memo
        if memo is None or memo[0] != trial._trial_id or _split_trials is None:
            return super()._sample(study, trial, search_space)
        if memo[1] is None:
            self._split_memo = memo = (memo[0], self._split(study, trial))
        below, above = memo[1]
        mpe_below = self._build_parzen_estimator(study, search_space, below, handle_below=True)
        mpe_above = self._build_parzen_estimator(study, search_space, above,
                                                 handle_below=False)
        samples = mpe_below.sample(self._rng.rng, self._n_ei_candidates)
        best = self._compare(samples, self._compute_acquisition_func(samples, mpe_below,
                                                                     mpe_above))
        return {name: dist.to_external_repr(best[name]) for name, dist in search_space.items()}

    def _get_internal_repr(self, trials: list[FrozenTrial],
                           search_space: dict[str, BaseDistribution],
                           study: optuna.Study) -> dict[str, np.ndarray]:
        """The stock method's columns (the values of the trials that have every parameter
        of ``search_space``), with each finished trial's row computed once per group."""
        if self._for_study != (study._storage, study._study_id):  # not the cached study
            return super()._get_internal_repr(trials, search_space, study)
        names = tuple(search_space)
        keys = search_space.keys()
        cache = self._internal.setdefault(names, {})  # trial id -> row, () if it lacks one
        rows = []
        for t in trials:
            if t.state.is_finished():
                row = cache.get(t._trial_id)
                if row is None:
                    params = t.params
                    row = cache[t._trial_id] = tuple(
                        search_space[n].to_internal_repr(params[n]) for n in names) \
                        if keys <= params.keys() else ()
            else:  # running: its shared relative parameters count (constant_liar)
                params = self._get_params(t, study)
                row = tuple(search_space[n].to_internal_repr(params[n]) for n in names) \
                    if keys <= params.keys() else ()
            if row:
                rows.append(row)
        columns = list(zip(*rows, strict=True)) if rows else [() for _ in names]
        return {n: np.asarray(col) for n, col in zip(names, columns, strict=True)}

    def _split(self, study: optuna.Study,
               trial: FrozenTrial) -> tuple[list[FrozenTrial], list[FrozenTrial]]:
        """The good (below) and poor (above) trials, as the stock sampler splits them:
        running trials count as poor with ``constant_liar`` (except this one)."""
        states = [TrialState.COMPLETE, TrialState.PRUNED]
        if self._constant_liar:
            states.append(TrialState.RUNNING)
        trials = study._get_trials(deepcopy=False, states=tuple(states),
                                   use_cache=not self._constant_liar)
        if self._constant_liar:
            trials = [t for t in trials if t.number != trial.number]
        if self._gamma is None:
            self._gamma = _stock.default_gamma if len(study.directions) <= 1 \
                else _stock.default_gamma_multiobjective
        n = sum(t.state != TrialState.RUNNING for t in trials)
        return _split_trials(study, trials, self._gamma(n))  # type: ignore[misc]


def _choice_key(value: Any) -> str:
    """A hashable, type-exact key for a categorical choice (None, bool, int, str, float)."""
    return f"{type(value).__name__}:{value!r}"

"""The search space, derived from the methods' parameter specs.

The merge method is a categorical choice (left out when only one method is searched, so
CMA-ES can run on it); each method's parameters are sampled only when it is chosen and
are named ``METHOD.PARAM`` (global) or ``METHOD.PARAM.MODEL`` (per-model), with ``@i``
appended for the i-th of k per-layer anchors. With ``space.shared``, a parameter several
methods sample from the same range drops the method (``weight.MODEL``, ``lambda``), so
every method's trials inform the sampler about it. A method that takes fewer models than
there are experts adds a categorical ``METHOD.models`` over the allowed subsets.

Example:
    >>> space = Space.build(SpaceConfig(methods=("ties",)), "b", ("x/e1", "x/e2"))
    >>> [n for n, _ in space.distributions("ties")][:3]
    ['ties.weight.e1', 'ties.weight.e2', 'ties.density.e1']
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
)
from optuna.trial import BaseTrial

from search.config import ConfigError, SpaceConfig
from search.errors import SoupError, one_line
from search.merge.methods import get_method, validate_recipe
from search.merge.spec import MergeMethod, ParamSpec
from search.names import short_names
from search.recipe import ModelEntry, Recipe
from search.study import ATTR_RECIPE

METHOD_KEY = "method"


@dataclass(frozen=True)
class _Param:
    """One sampled (or fixed) parameter of one method."""

    spec: ParamSpec
    model: int | None  # index into experts for per-model parameters
    dist: BaseDistribution | None  # None = fixed
    fixed: Any = None


def _override(cfg: SpaceConfig, method: str, name: str) -> tuple[Any, str]:
    """A parameter's setting in ``space.params`` (the method's own first), and its key."""
    per_method = cfg.params.get(method)
    if isinstance(per_method, Mapping) and name in per_method:
        return per_method[name], f"space.params.{method}.{name}"
    return cfg.params.get(name), f"space.params.{name}"


def _distribution(spec: ParamSpec, value: Any, where: str) -> tuple[BaseDistribution | None, Any]:
    """(distribution, fixed value) from a spec and an optional override."""
    if value is None:
        if spec.kind == "bool" or spec.search is None:
            return None, None  # the method's default
        return FloatDistribution(*spec.search), None
    if spec.kind == "bool":
        if isinstance(value, bool):
            return None, value
        if isinstance(value, Sequence) and set(value) <= {True, False} and len(set(value)) == 2:
            return CategoricalDistribution([False, True]), None
        raise ConfigError(f"{where}: use true, false or [false, true], got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        problem = spec.check(value)
        if problem:
            raise ConfigError(f"{where}: {problem} (valid: {spec.range_text()})")
        return None, float(value)
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        lo, hi = (float(v) for v in value)
        problem = spec.check(lo) or spec.check(hi)
        if problem or lo >= hi:
            raise ConfigError(f"{where}: range [{lo:g}, {hi:g}] must be increasing inside "
                              f"{spec.range_text()}")
        return FloatDistribution(lo, hi), None
    raise ConfigError(f"{where}: give [low, high] or a fixed number, got {value!r}")


class Space:
    """Maps Optuna trials to recipes and recipes back to trial parameters."""

    def __init__(self, cfg: SpaceConfig, base: str, experts: Sequence[str],
                 methods: Mapping[str, MergeMethod], seed: int = 0) -> None:
        self.cfg, self.base, self.seed = cfg, base, seed
        self.experts = tuple(experts)
        self.short = short_names(self.experts)
        self.methods = dict(methods)
        self.anchors = cfg.per_layer_anchors if cfg.per_layer_anchors >= 2 else 0
        self._params = {name: self._method_params(m) for name, m in self.methods.items()}
        self._shared = self._shared_names() if cfg.shared else {}

    @classmethod
    def build(cls, cfg: SpaceConfig, base: str, experts: Sequence[str], seed: int = 0) -> Space:
        """Checks the config against the methods' specs and the number of experts."""
        methods = {}
        for name in cfg.methods:
            m = get_method(name)
            if len(experts) < m.min_models:
                raise ConfigError(f"space.methods: {name} needs at least {m.min_models} "
                                  f"experts, the models config has {len(experts)}; remove it")
            methods[name] = m
        known = set(methods) | {p.name for m in methods.values() for p in m.params}
        for key, value in cfg.params.items():
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ConfigError(f"space.params.{key}: no searched method has this "
                                  f"parameter; {hint}known: {', '.join(sorted(known))}")
            if key in methods and not isinstance(value, Mapping):
                raise ConfigError(f"space.params.{key}: give a mapping of {key}'s parameters")
            if key in methods:
                own = [p.name for p in methods[key].params]
                for sub_key in value:
                    if sub_key not in own:
                        close = difflib.get_close_matches(str(sub_key), own, n=1)
                        hint = f"did you mean {close[0]!r}? " if close else ""
                        raise ConfigError(f"space.params.{key}.{sub_key}: {key} has no such "
                                          f"parameter; {hint}its parameters: {', '.join(own)}")
        return cls(cfg, base, experts, methods, seed)

    def _method_params(self, method: MergeMethod) -> list[_Param]:
        out: list[_Param] = []
        for spec in method.params:
            dist, fixed = _distribution(spec, *_override(self.cfg, method.name, spec.name))
            models: list[int | None] = list(range(len(self.experts))) \
                if spec.per_model and dist is not None else [None]
            out.extend(_Param(spec, i, dist, fixed) for i in models)
        return out

    def _shared_names(self) -> dict[str, BaseDistribution]:
        """Parameters that two or more methods sample from one and the same distribution
        (a method with another range for it keeps its own)."""
        dists: dict[str, list[BaseDistribution]] = {}
        for params in self._params.values():
            seen = {p.spec.name: p.dist for p in params if p.dist is not None}
            for name, dist in seen.items():
                dists.setdefault(name, []).append(dist)
        common = {n: max(ds, key=ds.count) for n, ds in dists.items()}
        return {n: d for n, d in common.items() if dists[n].count(d) > 1}

    def _subsets(self, method: MergeMethod) -> list[str]:
        if method.max_models is None or method.max_models >= len(self.experts):
            return []
        return ["+".join(c) for c in itertools.combinations(self.short, method.max_models)]

    def _names(self, method: str, p: _Param) -> list[str]:
        """The trial parameters of ``p``: one, or one per anchor (``NAME@i``)."""
        shared = self._shared.get(p.spec.name) == p.dist
        key = p.spec.name if shared else f"{method}.{p.spec.name}"
        key = key if p.model is None else f"{key}.{self.short[p.model]}"
        return [f"{key}@{i}" for i in range(self.anchors)] if self._anchored(p) else [key]

    def _anchored(self, p: _Param) -> bool:
        return bool(self.anchors) and p.spec.per_layer and isinstance(p.dist, FloatDistribution)

    def distributions(self, method: str) -> list[tuple[str, BaseDistribution]]:
        """Every sampled parameter of ``method`` with its distribution, in order."""
        out: list[tuple[str, BaseDistribution]] = []
        subsets = self._subsets(self.methods[method])
        if subsets:
            out.append((f"{method}.models", CategoricalDistribution(subsets)))
        for p in self._params[method]:
            if p.dist is not None:
                out.extend((name, p.dist) for name in self._names(method, p))
        return out

    @property
    def has_categorical(self) -> bool:
        """Whether any suggested parameter is categorical (CMA-ES cannot sample those)."""
        return len(self.methods) > 1 or any(isinstance(d, CategoricalDistribution)
                                            for m in self.methods for _, d in self.distributions(m))

    def suggest(self, trial: BaseTrial) -> Recipe:
        """Samples a method and its parameters from ``trial``; returns the recipe."""
        names = list(self.methods)
        method = names[0] if len(names) == 1 else str(trial.suggest_categorical(METHOD_KEY,
                                                                                 names))
        values = {k: _suggest(trial, k, d) for k, d in self.distributions(method)}
        return self._recipe(method, values)

    def _recipe(self, method: str, values: Mapping[str, Any]) -> Recipe:
        m = self.methods[method]
        chosen = list(range(len(self.experts)))
        if f"{method}.models" in values:
            wanted = str(values[f"{method}.models"]).split("+")
            chosen = [self.short.index(s) for s in wanted]
        per_model: dict[int, dict[str, Any]] = {i: {} for i in chosen}
        glob: dict[str, Any] = {}
        for p in self._params[method]:
            if p.dist is None:
                if p.fixed is not None:
                    glob[p.spec.name] = p.fixed
                continue
            names = self._names(method, p)
            value = [values[n] for n in names] if self._anchored(p) else values[names[0]]
            if p.model is None:
                glob[p.spec.name] = value
            elif p.model in per_model:
                per_model[p.model][p.spec.name] = value
        models = tuple(ModelEntry(self.experts[i], per_model[i]) for i in chosen)
        return Recipe(
            merge_method=method, models=models,
            base_model=None if m.base == "ignored" else self.base,
            parameters=glob, dtype=self.cfg.dtype,
            seed=self.seed if m.random else None,
        )

    def probes(self) -> list[Recipe]:
        """Each method once at its probe point: every weight 1, each other sampled value at
        its default when that lies inside its range (else mid-range: a density's default
        of 1, no sparsification, is the range's end), the first model subset."""
        out = []
        for method in self.methods:
            subsets = self._subsets(self.methods[method])
            values: dict[str, Any] = {f"{method}.models": subsets[0]} if subsets else {}
            for p in self._params[method]:
                default = 1.0 if p.spec.name == "weight" else p.spec.default
                if isinstance(p.dist, CategoricalDistribution):
                    value = default if default in p.dist.choices else p.dist.choices[0]
                elif isinstance(p.dist, FloatDistribution):
                    d = p.dist
                    inside = _fits(default, d, 0) and (p.spec.name == "weight"
                                                       or default not in (d.low, d.high))
                    value = default if inside else (d.low + d.high) / 2
                else:
                    continue
                values.update({n: value for n in self._names(method, p)})
            out.append(self._recipe(method, values))
        return out

    def recipe_of(self, trial: BaseTrial) -> tuple[Recipe | None, str]:
        """The trial's recipe, sampled or the one it was enqueued with, or the error (one
        line). An enqueued recipe the space expresses is suggested too, so the sampler learns
        from its values; one outside the space leaves the trial without parameters."""
        fixed = trial.user_attrs.get(ATTR_RECIPE)
        try:
            if fixed is None:
                recipe = self.suggest(trial)
            else:
                recipe = Recipe.from_dict(fixed)
                if self.params_for(recipe) is not None:
                    self.suggest(trial)
            validate_recipe(recipe)
        except SoupError as exc:
            return None, one_line(exc, with_type=True)
        return recipe, ""

    def params_for(self, recipe: Recipe) -> dict[str, Any] | None:
        """Trial parameters that reproduce ``recipe`` (for enqueuing), or ``None``.

        Experts missing from a recipe take their parameters' left-out values (weight 0:
        a soup of fewer models); any other value the space cannot express makes the
        recipe inexpressible.
        """
        method = recipe.merge_method
        if method not in self.methods:
            return None
        listed = {m.model: m for m in recipe.models}
        if set(listed) - set(self.experts):
            return None
        out: dict[str, Any] = {} if len(self.methods) == 1 else {METHOD_KEY: method}
        subsets = self._subsets(self.methods[method])
        if subsets:
            key = "+".join(self.short[i] for i, e in enumerate(self.experts) if e in listed)
            if key not in subsets:
                return None
            out[f"{method}.models"] = key
        for p in self._params[method]:
            if p.dist is None:
                if p.fixed is not None and recipe.parameters.get(p.spec.name, p.fixed) != p.fixed:
                    return None
                continue
            value: Any = None
            if p.model is not None:
                entry = listed.get(self.experts[p.model])
                if entry is None and subsets:
                    continue  # not in the chosen subset: its value is never used
                if entry is None and p.spec.left_out is None:
                    return None
                value = p.spec.left_out if entry is None else entry.parameters.get(p.spec.name)
            if value is None:
                value = recipe.parameters.get(p.spec.name, p.spec.default)
            if not _fits(value, p.dist, self.anchors if self._anchored(p) else 0):
                return None
            names = self._names(method, p)
            if self._anchored(p):
                vals = value if isinstance(value, list) else [value] * self.anchors
                out.update({n: float(v) for n, v in zip(names, vals, strict=True)})
            else:
                out[names[0]] = value
        return out


def _suggest(trial: BaseTrial, key: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if not isinstance(dist, FloatDistribution):
        raise TypeError(f"unsupported distribution {dist!r} for {key}")
    return trial.suggest_float(key, dist.low, dist.high)


def _fits(value: Any, dist: BaseDistribution, anchors: int) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    if anchors and isinstance(value, list):
        return len(value) == anchors and all(_fits(v, dist, 0) for v in value)
    return isinstance(dist, FloatDistribution) and isinstance(value, (int, float)) and \
        not isinstance(value, bool) and dist.low - 1e-12 <= float(value) <= dist.high + 1e-12

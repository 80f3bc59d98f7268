"""The data behind the report's figures, read from leaderboard rows and frozen trials.

Example:
    >>> round(eta_squared({"linear": [0.4, 0.5], "ties": [0.8, 0.9]}), 2)
    0.94
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, create_trial

from search import study as st
from search.names import name_map
from search.recipe import Recipe
from search.results.report.figures import Axis, Point

MIN_TRIALS = 10  # scored trials of one method before its parameter importances are shown
MAX_PANELS = 3  # methods shown in the importance figure
MAX_AXES = 24  # parallel-coordinate axes
METHOD_PARAM = "method"  # search.run.space.METHOD_KEY (not imported: space pulls in torch)


def points(rows: Sequence[dict[str, Any]], by_number: dict[int, FrozenTrial]) -> list[Point]:
    """One :class:`Point` per leaderboard row (scored, distinct candidates)."""
    out = []
    for r in rows:
        trial = by_number[r["trial"]]
        tags = [t for t in str(r["baseline"]).split(",") if t]
        if trial.user_attrs.get(st.ATTR_BASELINE) == "greedy_step":
            tags.append("greedy_step")
        parts = [t.replace("_", " ") for t in tags]
        if {"parent", "greedy_soup"} & set(tags):  # name the models once
            parts[0] += f" ({r['models']})"
        out.append(Point(int(r["trial"]), float(r["objective"]), str(r["method"]),
                         tuple(parts), tuple(float(v) for v in trial.values or [])))
    return out


def baselines(pts: Sequence[Point]) -> list[Point]:
    """The base, the parents, the uniform and the greedy soup, in trial order."""
    keep = ("base", "parent", "uniform soup", "greedy soup")
    return [p for p in sorted(pts, key=lambda p: p.trial)
            if any(tag.startswith(keep) for tag in p.tags)]


def eta_squared(groups: dict[str, list[float]]) -> float | None:
    """Share of the variance of all values that lies between the groups (``None``: undefined)."""
    values = [v for vs in groups.values() for v in vs]
    if len(groups) < 2 or len(values) < 3:
        return None
    mean = sum(values) / len(values)
    total = sum((v - mean) ** 2 for v in values)
    if total <= 0:
        return None
    between = sum(len(vs) * (sum(vs) / len(vs) - mean) ** 2 for vs in groups.values())
    return between / total


@dataclass
class Importances:
    """Per-method importances (panel title, {param: share}), the method's η², and notes."""

    panels: list[tuple[str, dict[str, float]]] = field(default_factory=list)
    method_eta2: float | None = None
    notes: list[str] = field(default_factory=list)


def _searched(t: FrozenTrial, method: str) -> dict[str, Any]:
    """The trial's own parameters of ``method``; none when they were not what it ran.

    A baseline the space cannot express is enqueued with no fixed parameters, so the
    sampler filled them in while the stored recipe ran: those values mean nothing.
    """
    fixed = t.system_attrs.get("fixed_params")
    if (fixed is not None and not fixed) or t.params.get(METHOD_PARAM, method) != method:
        return {}
    own = {k: v for k, v in t.params.items() if k.startswith(f"{method}.")}
    return own if len(own) == len(t.params) - (METHOD_PARAM in t.params) else {}


def _ped_anova(trials: Sequence[FrozenTrial], objective: dict[int, float],
               method: str) -> dict[str, float]:
    names = sorted(set.intersection(*(set(_searched(t, method)) for t in trials)))
    names = [n for n in names if len({repr(t.params[n]) for t in trials}) > 1]
    if not names:
        return {}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "study created in memory"
    try:
        sub = optuna.create_study(direction="maximize")
    finally:
        optuna.logging.set_verbosity(verbosity)
    sub.add_trials([create_trial(params={n: t.params[n] for n in names},
                                 distributions={n: t.distributions[n] for n in names},
                                 value=objective[t.number]) for t in trials])
    quantile = min(0.5, max(0.1, 5 / len(trials)))  # about five trials in the top set
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=quantile)
        raw = optuna.importance.get_param_importances(sub, evaluator=evaluator, params=names,
                                                      normalize=False)
    total = sum(raw.values())
    if not total > 0:
        return {}
    return {n[len(method) + 1:]: v / total for n, v in raw.items()}


def importances(rows: Sequence[dict[str, Any]], by_number: dict[int, FrozenTrial]
                ) -> Importances:
    """Importances within the most-tried methods, plus how much the method choice explains."""
    objective = {int(r["trial"]): float(r["objective"]) for r in rows}
    groups: dict[str, list[float]] = {}
    tried: dict[str, list[FrozenTrial]] = {}
    for r in rows:
        groups.setdefault(r["method"], []).append(float(r["objective"]))
        t = by_number[r["trial"]]
        if _searched(t, r["method"]):
            tried.setdefault(r["method"], []).append(t)
    out = Importances(method_eta2=eta_squared(groups))
    ranked = sorted(tried.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    for method, trials in [kv for kv in ranked if len(kv[1]) >= MIN_TRIALS][:MAX_PANELS]:
        shares = _ped_anova(trials, objective, method)
        if shares:
            out.panels.append((f"{method} (n={len(trials)})", shares))
        else:
            out.notes.append(f"Parameter importance of {method}: its parameters do not "
                             "separate its best trials from the rest (all importances 0).")
    if not out.panels:
        most = f"most: {ranked[0][0]}, {len(ranked[0][1])}" if ranked else "none yet"
        out.notes.append(f"Parameter importance: no method has {MIN_TRIALS} or more scored "
                         f"trials with searched parameters ({most}); run more trials.")
    if out.method_eta2 is not None:
        out.notes.append(f"Method choice: η² = {out.method_eta2:.2f}, the share of the score's "
                         f"variance between the {len(groups)} methods tried.")
    return out


def _record(recipe: Recipe, experts: Sequence[str],
            names: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """A recipe's values by axis name, and its per-model axis names.

    An expert the recipe leaves out takes the left-out value (weight 0) of each
    per-model parameter that the recipe sets and whose spec has one.
    """
    from search.merge.methods import param_spec  # pulls in torch: not at import

    per_model = {f"{k}.{names[m.model]}": v for m in recipe.models
                 for k, v in m.parameters.items()}
    missing = [e for e in experts if e not in recipe.model_names]
    for k in dict.fromkeys(k for m in recipe.models for k in m.parameters):
        spec = param_spec(recipe.merge_method, k)
        if spec is not None and spec.per_model and spec.left_out is not None:
            per_model.update({f"{k}.{names[e]}": spec.left_out for e in missing})
    return {"method": recipe.merge_method, **per_model, **recipe.parameters}, list(per_model)


def _value(v: Any) -> float | str | None:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
        return sum(float(x) for x in v) / len(v)  # per-layer values: their mean
    return None if v is None else str(v)


def _axis(name: str, values: list[float | str | None], scores: Sequence[float]) -> Axis:
    if any(isinstance(v, str) for v in values):
        best: dict[str, float] = {}
        for v, s in zip(values, scores, strict=True):
            if v is not None:
                best[str(v)] = max(best.get(str(v), -math.inf), s)
        cats = sorted(best, key=lambda c: best[c])
        pos = {c: (i / (len(cats) - 1) if len(cats) > 1 else 0.5) for i, c in enumerate(cats)}
        return Axis(name, tuple(math.nan if v is None else pos[str(v)] for v in values),
                    tuple((p, c) for c, p in pos.items()))
    nums = [float(v) for v in values if isinstance(v, float)]
    lo, hi = min(nums), max(nums)
    if hi - lo < 1e-12:
        return Axis(name, tuple(math.nan if v is None else 0.5 for v in values),
                    ((0.5, f"{lo:.3g}"),))
    return Axis(name, tuple(math.nan if v is None else (float(v) - lo) / (hi - lo)
                            for v in values), ((0.0, f"{lo:.3g}"), (1.0, f"{hi:.3g}")))


def parallel_axes(rows: Sequence[dict[str, Any]], by_number: dict[int, FrozenTrial],
                  experts: Sequence[str], names: dict[str, str] | None = None) -> list[Axis]:
    """Normalized axes (method, PARAM.MODEL, global params) over ``rows``' recipes.

    ``names`` are the models' short names (:func:`search.names.name_map`; the
    leaderboard's ``names``); by default they are derived from ``experts`` and the rows.
    """
    recipes = [Recipe.from_dict(by_number[r["trial"]].user_attrs[st.ATTR_RECIPE]) for r in rows]
    if names is None:
        names = name_map(experts, [m for recipe in recipes for m in recipe.model_names])
    pairs = [_record(recipe, experts, names) for recipe in recipes]
    records = [rec for rec, _ in pairs]
    per_model = {k for _, keys in pairs for k in keys}
    order = list(dict.fromkeys(k for rec in records for k in rec))
    shorts = [names[e] for e in experts]
    params = list(dict.fromkeys(k.split(".")[0] for k in order if k in per_model))

    def rank(k: str) -> tuple[int, int, int]:
        if k == "method":
            return (0, 0, 0)
        if k in per_model:
            p, _, model = k.partition(".")
            return (1, params.index(p), shorts.index(model) if model in shorts else 99)
        return (2, order.index(k), 0)

    keys = sorted(order, key=rank)
    present = {k: sum(k in rec for rec in records) for k in keys}
    keys = [k for k in keys if k in sorted(keys, key=lambda k: -present[k])[:MAX_AXES]]
    scores = [float(r["objective"]) for r in rows]
    return [_axis(k, [_value(rec.get(k)) for rec in records], scores) for k in keys]

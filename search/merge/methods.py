"""The method registry (one plain dict, built here) and recipe checks against specs.

Example:
    >>> sorted(REGISTRY)[:3]
    ['breadcrumbs', 'breadcrumbs_ties', 'dare_linear']
    >>> get_method("tie")
    Traceback (most recent call last):
    ...
    search.errors.InvalidRecipeError: unknown merge_method 'tie'; did you mean 'ties'? ...
"""

from __future__ import annotations

import difflib
import logging
from typing import Any

from search.errors import InvalidRecipeError
from search.merge import linear, model_stock, task_arithmetic
from search.merge.spec import MergeMethod, ParamSpec
from search.recipe import ModelEntry, Recipe

REGISTRY: dict[str, MergeMethod] = {
    m.name: m for m in (*linear.METHODS, *task_arithmetic.METHODS, *model_stock.METHODS)
}


_ALL_PARAMS = {p.name for m in REGISTRY.values() for p in m.params}
# The first registered spec of each parameter name; methods that share a name share its
# symbol and left-out value (tests/search/merge/test_param_display.py checks this).
_BY_NAME: dict[str, ParamSpec] = {}
for _m in REGISTRY.values():
    for _p in _m.params:
        _BY_NAME.setdefault(_p.name, _p)
log = logging.getLogger(__name__)


def param_spec(method: str, name: str) -> ParamSpec | None:
    """The spec of parameter ``name`` of ``method``, for showing a stored recipe.

    A recipe may carry a parameter its method ignores (mergekit allows that), and a study
    may hold a method this version no longer has: then the spec of that name of any
    method answers, and ``None`` when no method has such a parameter.

    Example:
        >>> param_spec("ties", "lambda").label, param_spec("ties", "epsilon").label
        ('λ', 'ε')
    """
    own = REGISTRY[method].spec(name) if method in REGISTRY else None
    return own or _BY_NAME.get(name)


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``, with a did-you-mean error otherwise."""
    if name in REGISTRY:
        return REGISTRY[name]
    close = difflib.get_close_matches(name, REGISTRY, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise InvalidRecipeError(
        f"unknown merge_method {name!r}; {hint}available: {', '.join(sorted(REGISTRY))}"
    )


def _leaf_values(value: Any) -> list[Any]:
    if isinstance(value, list) and value and isinstance(value[0], dict):
        out: list[Any] = []
        for cond in value:
            out.extend(_leaf_values(cond["value"]))
        return out
    return list(value) if isinstance(value, list) else [value]


def _check_value(method: MergeMethod, key: str, value: Any, where: str) -> None:
    spec = method.spec(key)
    if spec is None and key in _ALL_PARAMS:
        log.warning("%s: %s does not use %r; ignored (as mergekit does)", where, method.name, key)
        return
    if spec is None:
        known = ", ".join(p.name for p in method.params) or "none"
        close = difflib.get_close_matches(key, [p.name for p in method.params], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise InvalidRecipeError(
            f"{where}: {method.name} has no parameter {key!r}; {hint}its parameters: {known}"
        )
    if isinstance(value, list) and not spec.per_layer:
        raise InvalidRecipeError(
            f"{where}.{key}: {method.name}'s {key} cannot vary per layer; give one value"
        )
    for leaf in _leaf_values(value):
        problem = spec.check(leaf)
        if problem:
            raise InvalidRecipeError(f"{where}.{key}: {problem} (valid: {spec.range_text()})")


def validate_recipe(recipe: Recipe) -> MergeMethod:
    """Checks method, roles and parameter ranges before any heavy work.

    Returns the method. Raises :class:`InvalidRecipeError` with one actionable line.
    """
    method = get_method(recipe.merge_method)
    if method.base == "required" and not recipe.base_model:
        raise InvalidRecipeError(f"{method.name} needs 'base_model'; add it to the recipe")
    n_inputs = len(input_models(recipe, method))
    if n_inputs < method.min_models or (method.max_models and n_inputs > method.max_models):
        want = (f"exactly {method.min_models}" if method.max_models == method.min_models
                else f"at least {method.min_models}" + (
                    f" and at most {method.max_models}" if method.max_models else ""))
        raise InvalidRecipeError(
            f"{method.name} takes {want} model(s) besides the base, got {n_inputs}"
        )
    if recipe.chat_template is not None:
        raise InvalidRecipeError("chat_template is not supported; remove it (the output keeps "
                                 "the tokenizer's own chat template)")
    for key, value in recipe.parameters.items():
        _check_value(method, key, value, "parameters")
    for i, entry in enumerate(recipe.models):
        for key, value in entry.parameters.items():
            spec = method.spec(key)
            if spec is not None and not spec.per_model:
                raise InvalidRecipeError(
                    f"models[{i}].parameters.{key}: {key} is global for {method.name}; "
                    "move it to the top-level 'parameters'"
                )
            _check_value(method, key, value, f"models[{i}].parameters")
    for spec in method.params:
        if not spec.required or spec.name in recipe.parameters:
            continue
        missing = [m.model for m in _inputs(recipe, method) if spec.name not in m.parameters]
        if not spec.per_model or missing:
            who = f" for model {missing[0]!r}" if spec.per_model else ""
            raise InvalidRecipeError(
                f"{method.name} needs parameter {spec.name!r}{who}; set it in "
                f"{'the model entry or ' if spec.per_model else ''}the top-level parameters"
            )
    return method


def _inputs(recipe: Recipe, method: MergeMethod) -> list[ModelEntry]:
    if method.base != "ignored":
        return [m for m in recipe.models if m.model != recipe.base_model]
    entries = list(recipe.models)
    if recipe.base_model and recipe.base_model not in recipe.model_names:
        entries.append(ModelEntry(recipe.base_model))  # mergekit averages it in, last
    return entries


def input_models(recipe: Recipe, method: MergeMethod) -> list[str]:
    """The models stacked as ``x`` for ``method``.

    The base is removed where the method gives it a role; where it has none
    (``linear``) a base that is not listed is appended last, as mergekit does.
    """
    names = [m.model for m in _inputs(recipe, method)]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InvalidRecipeError(f"model {dup!r} is listed twice; list each model once")
    return names

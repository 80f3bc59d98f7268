"""docs/methods.md: every merge method, from the registry and its parameter specs.

Example:
    >>> print(example_recipe(REGISTRY["model_stock"]), end="")
    merge_method: model_stock
    base_model: path/to/base
    models:
      - model: path/to/expert_1
      - model: path/to/expert_2
    >>> render_methods().startswith(HEADER)
    True
"""

from __future__ import annotations

import ast
import inspect
import sys
from collections.abc import Callable
from typing import Any

from docs_common import HEADER, anchor, code, contents, docstring_md, table, template, value_text

from search.merge.methods import REGISTRY
from search.merge.spec import MergeMethod, ParamSpec

BASE_TEXT = {
    "required": "required: the base is θ_base in the formula, not one of the inputs",
    "optional": "optional: with a base the method works on task vectors θᵢ - θ_base",
    "ignored": "none: a `base_model` that is not listed in `models` is averaged in last, "
               "as mergekit does",
}
BASE_SHORT = {"required": "required", "optional": "optional", "ignored": "no (averaged in)"}

METHODS_INTRO = """\
Every merge method of soupsearch, generated from the registry in
`search/merge/methods.py`: each method declares its parameters (name, valid range, default,
per model or global, whether values may vary per layer, the range a search samples), and
the recipe checks, the search space and this page are all derived from those declarations.
`soup methods` prints the same list. Semantics follow mergekit 0.1.5 for the same recipe;
README.md lists the deliberate differences."""

PARAMS_TEXT = """\
- **Per model** parameters go under each entry of `models:` (`models[i].parameters`); a
  value in the top-level `parameters:` is the fallback for every model. **Global**
  parameters go in the top-level `parameters:` only; under a model entry they are an error
  that says where they belong.
- **Per layer**: a value may be a number, a list of numbers (a gradient interpolated
  across layer depth) or a list of `{filter: SUBSTRING, value: ...}` conditions (the first
  filter contained in the tensor name wins; an entry without `filter` matches every
  tensor). Parameters marked "no" take one value.
- **Valid range** is checked before any weight is loaded: a value outside it is an error
  naming the parameter and the range.
- **Searched**: `soup search` samples a float parameter uniformly from this range, one
  value per expert for per-model parameters (and `space.per_layer_anchors` values across
  depth for per-layer ones). Override a range in `conf/space/` with `NAME: [low, high]`,
  fix it with `NAME: value`, or scope either to one method with `METHOD: {NAME: ...}`.
  Booleans and parameters without a searched range keep their default unless the space
  sets them (`NAME: [false, true]` searches a boolean).
- A parameter of another method (say `weight` on `model_stock`) is ignored with a
  warning, as in mergekit; an unknown name is an error with a did-you-mean hint."""


def family(method: MergeMethod) -> str:
    """The module that defines ``method`` (its family), e.g. ``task_arithmetic``."""
    return str(method.fn.__module__).rsplit(".", 1)[-1]


def _range_cell(spec: ParamSpec) -> str:
    return "true / false" if spec.kind == "bool" else code(spec.range_text())


def _default_cell(spec: ParamSpec) -> str:
    if spec.required or spec.default is None:
        return "**required**"
    return code(value_text(spec.default))


def _search_cell(spec: ParamSpec) -> str:
    if spec.search is not None:
        return code(f"[{spec.search[0]:g}, {spec.search[1]:g}]")
    if spec.kind == "bool":
        return "fixed (searchable as `[false, true]`)"
    return "fixed at the default"


def param_table(method: MergeMethod) -> str:
    """The parameter table of one method."""
    rows = [[code(p.name), "per model" if p.per_model else "global", _range_cell(p),
             _default_cell(p), "yes" if p.per_layer else "no", _search_cell(p), p.doc]
            for p in method.params]
    return table(["parameter", "scope", "valid range", "default", "per layer", "searched",
                  "meaning"], rows)


def _example_value(spec: ParamSpec) -> Any:
    if spec.kind == "bool":
        return spec.default
    if spec.search is not None:
        return round((spec.search[0] + spec.search[1]) / 2, 3)
    return spec.default if spec.default is not None else spec.low or 0.5


def example_recipe(method: MergeMethod) -> str:
    """A minimal valid recipe for ``method``: searched values at the middle of their range."""
    shown = [p for p in method.params if p.required or p.search is not None]
    n = max(method.min_models, 2)
    n = min(n, method.max_models) if method.max_models else n
    lines = [f"merge_method: {method.name}"]
    if method.base != "ignored":
        lines.append("base_model: path/to/base")
    lines.append("models:")
    per_model = {p.name: _example_value(p) for p in shown if p.per_model}
    for i in range(n):
        lines.append(f"  - model: path/to/expert_{i + 1}")
        if per_model:
            lines.append(f"    parameters: {value_text(per_model)}")
    glob = {p.name: _example_value(p) for p in shown if not p.per_model}
    if glob:
        lines.append(f"parameters: {value_text(glob)}")
    if method.random:
        lines.append("seed: 0")
    return "\n".join(lines) + "\n"


def _models_text(method: MergeMethod) -> str:
    lo, hi = method.min_models, method.max_models
    if hi == lo:
        return f"exactly {lo}"
    return f"at least {lo}" + (f", at most {hi}" if hi else "")


def method_section(method: MergeMethod) -> str:
    """One method: summary, formula, roles, parameters and an example recipe."""
    formula = method.formula or inspect.getdoc(method.fn) or "(no formula declared)"
    facts = [f"- **Base model**: {BASE_TEXT[method.base]}.",
             f"- **Input models** (besides the base): {_models_text(method)}."]
    if method.random:
        facts.append("- **Random**: draws from a generator seeded per tensor from the "
                     "recipe's `seed`, so a recipe is reproducible.")
    if method.normalize_sum:
        facts.append("- With `normalize: true` the weights must not sum to zero.")
    if method.check is not None:
        facts.append(f"- **Cross-parameter check** (`{method.check.__name__}`): "
                     f"{check_text(method.check)}")
    return "\n".join([
        f"### {method.name}", "", method.summary or "(no summary declared)", "",
        "```text", *formula.split(";  "), "```", "", *facts, "",
        param_table(method), "", "Example recipe:", "",
        "```yaml", example_recipe(method).rstrip(), "```", "",
    ])


def check_text(check: Callable[..., Any]) -> str:
    """A cross-parameter check's docstring, else the messages it returns."""
    doc = inspect.getdoc(check)
    if doc:
        return docstring_md(doc)
    tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(check)))
    found = [template(n.value) for n in ast.walk(tree)
             if isinstance(n, ast.Return) and n.value is not None]
    messages = [code(" ".join(m.split())) for m in found if m]
    return "fails with " + " or ".join(messages) if messages else "see the source."


def _families() -> dict[str, list[MergeMethod]]:
    out: dict[str, list[MergeMethod]] = {}
    for method in REGISTRY.values():
        out.setdefault(family(method), []).append(method)
    return out


def _family_title(name: str) -> str:
    return name.replace("_", " ").capitalize() + " family"


def render_methods() -> str:
    """The text of docs/methods.md."""
    families = _families()
    toc: list[tuple[int, str]] = [(0, "Overview"), (0, "Parameters: scope, layers, search")]
    for fam, methods in families.items():
        toc += [(0, _family_title(fam)), *[(1, m.name) for m in methods]]
    overview = table(["method", "family", "base", "models", "parameters (* = per model)"], [
        [f"[{m.name}]({anchor(m.name)})", family(m), BASE_SHORT[m.base], _models_text(m),
         ", ".join(p.name + ("\\*" if p.per_model else "") for p in m.params)]
        for m in REGISTRY.values()])
    parts = [HEADER, "# Merge methods", "", METHODS_INTRO, "", "## Contents", "",
             contents(toc), "", "## Overview", "", overview, "",
             "## Parameters: scope, layers, search", "", PARAMS_TEXT, ""]
    for fam, methods in families.items():
        module = sys.modules[methods[0].fn.__module__]
        doc = inspect.getdoc(module) or ""
        parts += [f"## {_family_title(fam)}", "",
                  f"Defined in `{module.__name__.replace('.', '/')}.py`.", "",
                  docstring_md(doc), ""]
        parts += [method_section(m) for m in methods]
    return "\n".join(parts).rstrip() + "\n"

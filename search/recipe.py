"""Merge recipes: plain data, a canonical hash, and mergekit-compatible YAML.

A :class:`Recipe` is the ``models:`` form of a mergekit configuration::

    merge_method: ties
    base_model: ./base
    models:
      - model: ./expert-a
        parameters: {weight: 0.6, density: 0.5}
      - model: ./expert-b
        parameters: {weight: [0.2, 0.8], density: 0.5}   # per-layer gradient
    parameters: {normalize: true}
    dtype: float32

Parameter values are a number or bool, a list of numbers (interpolated across layer
depth), or a list of ``{filter: <substring>, value: <value>}`` conditions where the
first matching filter wins (an entry without ``filter`` matches every tensor).

This module is the bottom of the house: it imports nothing else from the project but
:mod:`search.errors` (also plain: it imports nothing).
Checking values against a method's parameter specs happens in ``search.merge``.

Example:
    >>> r = Recipe.from_yaml("merge_method: linear\\nmodels:\\n  - model: a\\n  - model: b\\n")
    >>> r.model_names
    ('a', 'b')
    >>> Recipe.from_yaml(r.to_yaml()).hash() == r.hash()
    True
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from search.atomic import write_text
from search.errors import SoupError

# Keys of mergekit's configuration that this project reads and writes.
_TOP_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "chat_template",
    "seed",
}
DTYPES = ("float32", "float16", "bfloat16", "float64")

ParamValue = Any  # float | bool | str | list[float] | list[dict[str, Any]]


class RecipeError(SoupError, ValueError):
    """A recipe file or mapping is malformed (structure, not parameter ranges)."""


def _canon_value(value: Any, where: str) -> Any:
    """Normalizes a parameter value: numbers to float, conditions to dicts."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        if isinstance(value, int) and abs(value) > 2**53:
            raise RecipeError(f"{where}: value {value} is too large; use a float")
        if not math.isfinite(float(value)):
            raise RecipeError(f"{where}: value {value!r} is not finite; use a finite number")
        return float(value)
    if isinstance(value, (list, tuple)):
        if not value:
            raise RecipeError(f"{where}: empty list; give a number or a non-empty list")
        if all(isinstance(v, Mapping) for v in value):
            conds = []
            for i, cond in enumerate(value):
                unknown = set(cond) - {"filter", "value"}
                if unknown or "value" not in cond:
                    raise RecipeError(
                        f"{where}[{i}]: a condition needs keys 'value' and optionally "
                        f"'filter' (got {sorted(cond)})"
                    )
                flt = cond.get("filter")
                conds.append(
                    {"filter": None if flt is None else str(flt),
                     "value": _canon_value(cond["value"], f"{where}[{i}].value")}
                )
            return conds
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return [_canon_value(v, where) for v in value]
        if all(isinstance(v, bool) for v in value) or all(isinstance(v, str) for v in value):
            return list(value)  # stepped across depth, as in mergekit
        raise RecipeError(
            f"{where}: a list must hold only numbers (a per-layer gradient), only "
            f"true/false steps, or only {{filter, value}} conditions"
        )
    raise RecipeError(f"{where}: unsupported value {value!r} of type {type(value).__name__}")


def _canon_params(params: Any, where: str) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise RecipeError(f"{where}: 'parameters' must be a mapping, got {type(params).__name__}")
    return {str(k): _canon_value(v, f"{where}.{k}") for k, v in params.items()}


@dataclass(frozen=True)
class ModelEntry:
    """One input model of a recipe and its per-model parameters."""

    model: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """A merge recipe in mergekit's ``models:`` form (see the module docstring)."""

    merge_method: str
    models: tuple[ModelEntry, ...]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None
    seed: int | None = None

    @property
    def model_names(self) -> tuple[str, ...]:
        """The ``model`` of each entry, in order."""
        return tuple(m.model for m in self.models)

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> Recipe:
        """Builds a recipe from a parsed mergekit-style mapping."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"{where}: expected a mapping at the top level")
        if "slices" in data:
            raise RecipeError(
                f"{where}: uses 'slices:'; soupsearch reads mergekit's 'models:' form, "
                "rewrite the recipe with 'models:'"
            )
        unknown = set(data) - _TOP_KEYS
        if unknown:
            raise RecipeError(
                f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}"
            )
        if not data.get("merge_method"):
            raise RecipeError(f"{where}: 'merge_method' is missing")
        raw_models = data.get("models")
        if not isinstance(raw_models, list) or not raw_models:
            raise RecipeError(f"{where}: 'models' must be a non-empty list of {{model: ...}}")
        models = []
        for i, entry in enumerate(raw_models):
            if isinstance(entry, str):
                entry = {"model": entry}
            if not isinstance(entry, Mapping) or not entry.get("model"):
                raise RecipeError(f"{where}.models[{i}]: needs a 'model' key")
            extra = set(entry) - {"model", "parameters"}
            if extra:
                raise RecipeError(f"{where}.models[{i}]: unknown key(s) {sorted(extra)}")
            models.append(
                ModelEntry(str(entry["model"]),
                           _canon_params(entry.get("parameters"), f"{where}.models[{i}]"))
            )
        dtypes = {}
        for key in ("dtype", "out_dtype"):
            value = data.get(key)
            if isinstance(value, str) and value.startswith("torch."):
                value = value[len("torch."):]
            if value is not None and value not in DTYPES:
                raise RecipeError(f"{where}: {key} {data[key]!r} is not one of {DTYPES}")
            dtypes[key] = value
        for key in ("tokenizer_source", "chat_template"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise RecipeError(f"{where}: {key} must be a string, got {data[key]!r}")
        seed = data.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RecipeError(f"{where}: 'seed' must be an integer, got {seed!r}")
        base = data.get("base_model")
        return cls(
            merge_method=str(data["merge_method"]),
            models=tuple(models),
            base_model=None if base is None else str(base),
            parameters=_canon_params(data.get("parameters"), f"{where}.parameters"),
            dtype=dtypes["dtype"],
            out_dtype=dtypes["out_dtype"],
            tokenizer_source=data.get("tokenizer_source"),
            chat_template=data.get("chat_template"),
            seed=seed,
        )

    @classmethod
    def from_yaml(cls, text: str, where: str = "recipe") -> Recipe:
        """Parses mergekit-style YAML text."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            reason = str(exc).replace("\n", " ")
            raise RecipeError(f"{where}: not valid YAML ({reason})") from None
        return cls.from_dict(data, where)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Recipe:
        """Reads a recipe YAML file."""
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"recipe file {str(p)!r} does not exist; check the path")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"recipe file {str(p)!r} cannot be read as UTF-8 text ({exc})") \
                from None
        return cls.from_yaml(text, where=str(p))

    def to_dict(self) -> dict[str, Any]:
        """The mergekit-style mapping (keys that are unset are left out)."""
        out: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model is not None:
            out["base_model"] = self.base_model
        out["models"] = [
            {"model": m.model, **({"parameters": dict(m.parameters)} if m.parameters else {})}
            for m in self.models
        ]
        if self.parameters:
            out["parameters"] = dict(self.parameters)
        for key in ("dtype", "out_dtype", "tokenizer_source", "chat_template", "seed"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def to_yaml(self) -> str:
        """mergekit-style YAML text."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the YAML atomically (temp file, then rename)."""
        write_text(path, self.to_yaml())

    def canonical(self) -> str:
        """A canonical JSON text: equal for recipes that mean the same merge.

        Numbers are floats (``1`` == ``1.0``), parameter keys are sorted, model order
        is kept (it matters for slerp and nuslerp).
        """
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def hash(self) -> str:
        """SHA-256 of :meth:`canonical`, as 16 hex digits."""
        return hashlib.sha256(self.canonical().encode()).hexdigest()[:16]

    def with_changes(self, **changes: Any) -> Recipe:
        """A copy with some fields replaced."""
        return replace(self, **changes)

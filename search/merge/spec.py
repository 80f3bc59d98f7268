"""Declarations every merge method makes about itself: parameter specs and roles.

The search space, recipe validation and the generated docs are all derived from these
declarations; no other module special-cases a method by name.

Example:
    >>> ParamSpec("density", 1.0, per_model=True, low=0.0, low_open=True, high=1.0).check(0.5)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

MergeFn = Callable[..., Tensor]


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a merge method.

    Attributes:
        name: the key in a recipe's ``parameters``.
        default: used when the recipe does not set it; ``None`` with ``required``.
        per_model: set on each model entry (global ``parameters`` act as fallback).
        kind: ``float`` or ``bool``.
        low, high: the valid range; ``low_open``/``high_open`` exclude the bound.
        required: the recipe must set it.
        per_layer: may vary across depth (gradient list) or by tensor filter.
        search: the range a search samples from by default; ``None`` = not searched.
        doc: one line for the docs.
        symbol: the short name that leaderboards and reports print (``w``, ``λ``);
            empty: the name itself (see :attr:`label`).
        left_out: for a per-model parameter, the value that leaves a model out of the
            merge (a weight of 0): an expert missing from a recipe has this value.
            ``None``: no value does, so a recipe that omits a model is not the same
            merge as one that lists it with some value.
    """

    name: str
    default: float | bool | None
    per_model: bool = False
    kind: Literal["float", "bool"] = "float"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    required: bool = False
    per_layer: bool = True
    search: tuple[float, float] | None = None
    doc: str = ""
    symbol: str = ""
    left_out: float | None = None

    @property
    def label(self) -> str:
        """The symbol, or the name when the spec declares none."""
        return self.symbol or self.name

    def range_text(self) -> str:
        """The valid range in interval notation, e.g. ``(0, 1]``."""
        if self.kind == "bool":
            return "true/false"
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        return f"{left}{lo}, {hi}{right}"

    def check(self, value: Any) -> str | None:
        """Returns a problem description, or ``None`` when ``value`` is valid."""
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {value!r}"
        v = float(value)
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return f"{v:g} is outside {self.range_text()}"
        if self.high is not None and (v > self.high or (self.high_open and v == self.high)):
            return f"{v:g} is outside {self.range_text()}"
        return None


BaseRole = Literal["ignored", "required", "optional"]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    Attributes:
        name: the recipe's ``merge_method``.
        fn: ``fn(x, *, base, out=None, generator=None, **params) -> Tensor`` where
            ``x`` stacks the input models on dim 0 (the base is never in ``x``),
            per-model parameters arrive as tuples aligned with ``x`` and global ones
            as scalars. It writes into ``out`` when given.
        params: the parameter specs.
        base: ``required``/``optional``: the base is passed as ``base`` and removed
            from the inputs; ``ignored``: the base only matters if listed in ``models``.
        min_models, max_models: bounds on the number of inputs (excluding the base).
        random: takes a ``generator`` (seeded per tensor by the executor).
        summary, formula: for the docs.
        normalize_sum: the result is divided by the plain sum of ``weight`` when
            ``normalize`` is true, so a zero sum is invalid.
        check: optional cross-parameter check on one tensor's resolved parameters;
            returns a problem description or ``None``.
        ranks: ``fn`` accepts ``ranks``, the magnitude order of each input's task vector
            of this kind (a key of ``ops.RANKERS``), which a resident executor can
            compute once per parent; ``None`` when the method needs none.
    """

    name: str
    fn: MergeFn
    params: tuple[ParamSpec, ...]
    base: BaseRole
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    summary: str = ""
    formula: str = ""
    normalize_sum: bool = False
    check: Callable[[dict[str, Any]], str | None] | None = None
    ranks: str | None = None

    def spec(self, name: str) -> ParamSpec | None:
        """The spec called ``name``, if any."""
        return next((p for p in self.params if p.name == name), None)

    def normalizes(self, parameters: Mapping[str, Any]) -> bool:
        """Whether a recipe with these global ``parameters`` divides by the plain sum of
        the weights (``normalize_sum`` with ``normalize`` on), so that scaling every
        weight alike, or a lone model's weight, changes nothing."""
        spec = self.spec("normalize")
        return self.normalize_sum and spec is not None and \
            parameters.get("normalize", spec.default) is True

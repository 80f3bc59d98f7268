"""From a recipe to per-tensor work: who is the base, what is stacked, which values.

A :class:`MergePlan` is shared by the streaming and the resident executor, so both
call the same method function with the same inputs and get bit-identical results.

Example:
    >>> from search.recipe import Recipe
    >>> r = Recipe.from_yaml("merge_method: linear\\nmodels: [{model: a}, {model: b}]\\n"
    ...                      "parameters: {weight: 0.5}\\n")
    >>> plan = MergePlan.build(r)
    >>> plan.params_for("model.layers.0.mlp.up_proj.weight", 0.0)
    {'weight': (0.5, 0.5), 'normalize': True}
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from search.errors import InvalidRecipeError, NonFiniteMergeError
from search.merge import layers
from search.merge.methods import input_models, validate_recipe
from search.merge.spec import MergeMethod, ParamSpec
from search.recipe import Recipe


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed, independent of the order tensors are merged in."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def finite(t: Tensor) -> bool:
    """All values finite; one read pass, no temporary (NaN propagates through min/max)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


@dataclass(frozen=True)
class MergePlan:
    """A validated recipe with its roles resolved.

    Attributes:
        recipe: the recipe.
        method: its merge method.
        inputs: the models stacked as ``x``, in order.
        base: the model passed as ``base`` (``None`` when the method takes none).
        models: every model the merge reads (inputs, then the base if separate).
    """

    recipe: Recipe
    method: MergeMethod
    inputs: tuple[str, ...]
    base: str | None

    @classmethod
    def build(cls, recipe: Recipe) -> MergePlan:
        """Validates ``recipe`` against its method's specs and resolves roles."""
        method = validate_recipe(recipe)
        inputs = tuple(input_models(recipe, method))
        base = None if method.base == "ignored" else recipe.base_model
        return cls(recipe, method, inputs, base)

    @property
    def models(self) -> tuple[str, ...]:
        return self.inputs + ((self.base,) if self.base and self.base not in self.inputs else ())

    @property
    def seed(self) -> int:
        return 0 if self.recipe.seed is None else self.recipe.seed

    def _value(self, spec: ParamSpec, name: str, t: float, model: str | None) -> Any:
        scopes = []
        if model is not None:
            scopes += [m.parameters for m in self.recipe.models if m.model == model]
        scopes.append(self.recipe.parameters)
        for scope in scopes:
            if spec.name in scope:
                value = layers.evaluate(scope[spec.name], name, t)
                if value is not None:
                    return value
        if spec.default is None:
            who = f" for model {model!r}" if model else ""
            raise InvalidRecipeError(
                f"{self.method.name} needs parameter {spec.name!r}{who} (tensor {name}); "
                "set it in the model's parameters or the top-level parameters"
            )
        return spec.default

    def params_for(self, name: str, t: float) -> dict[str, Any]:
        """The parameter values for tensor ``name`` at depth ``t``.

        Per-model parameters are tuples aligned with :attr:`inputs`. Raises
        :class:`InvalidRecipeError` for missing or inconsistent values.
        """
        out: dict[str, Any] = {}
        for spec in self.method.params:
            if spec.per_model:
                out[spec.name] = tuple(self._value(spec, name, t, m) for m in self.inputs)
            else:
                out[spec.name] = self._value(spec, name, t, None)
        divides = self.method.normalize_sum and out.get("normalize", True) and "weight" in out
        if divides and abs(sum(out["weight"])) < 1e-8:
            raise InvalidRecipeError(
                f"weights sum to 0 for tensor {name} with normalize: true; change the "
                "weights or set normalize: false"
            )
        problem = self.method.check(out) if self.method.check else None
        if problem:
            raise InvalidRecipeError(f"{self.method.name}, tensor {name}: {problem}")
        return out

    def resolve_all(self, names: list[str], num_layers: int) -> dict[str, dict[str, Any]]:
        """Parameters for every tensor, computed (and validated) before heavy work."""
        return {n: self.params_for(n, layers.depth(n, num_layers)) for n in names}

    def run(self, name: str, params: dict[str, Any], x: Tensor, base: Tensor | None,
            out: Tensor | None = None, check_finite: bool = True,
            ranks: list[Tensor] | None = None) -> Tensor:
        """Merges one tensor. ``x`` stacks :attr:`inputs`; writes into ``out`` if given.

        ``ranks`` (for methods that declare a ``ranks`` kind) are precomputed orders of
        each input's task vector; they change the speed, never the result.
        """
        if not x.is_floating_point():
            others = [x[i] for i in range(1, x.shape[0])] + ([base] if base is not None else [])
            if any(not torch.equal(x[0], o) for o in others):
                raise InvalidRecipeError(
                    f"non-float tensor {name} differs between models; it cannot be merged"
                )
            return x[0] if out is None else out.copy_(x[0])
        gen = None
        if self.method.random:
            gen = torch.Generator(device=x.device).manual_seed(tensor_seed(self.seed, name))
        extra: dict[str, Any] = {"generator": gen} if gen is not None else {}
        if ranks is not None and self.method.ranks:
            extra["ranks"] = ranks
        res = self.method.fn(x, base=base, out=out, **extra, **params)
        if check_finite and not finite(res):
            raise NonFiniteMergeError(
                f"merged tensor {name} has NaN or infinite values ({self.method.name}); "
                "check the parents for NaNs and use smaller weights or lambda"
            )
        return res

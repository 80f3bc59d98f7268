"""The task-arithmetic family as ONE pipeline with switches.

    delta_i = θ_i - θ_base
    delta_i = sparsify(delta_i)              # none | magnitude | random | outliers | della
    m_i     = w_i · delta_i
    mask_i  = sign(m_i) == elected sign      # consensus: none | sum
    δ       = Σ_i mask_i m_i   [/ Σ_i mask_i w_i  if normalize]
    θ       = θ_base + λ · δ

task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della and
della_linear are rows of a table of switches (see ``_FAMILY``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from search.merge import ops
from search.merge.spec import MergeMethod, ParamSpec

WEIGHT = ParamSpec("weight", None, per_model=True, required=True, search=(0.0, 1.0),
                   doc="scale of this model's task vector")
DENSITY = ParamSpec("density", 1.0, per_model=True, low=0.0, low_open=True, high=1.0,
                    search=(0.1, 1.0), doc="fraction of each task vector's entries kept")
GAMMA = ParamSpec("gamma", 0.01, per_model=True, low=0.0, high=1.0, search=(0.0, 0.1),
                  doc="fraction of largest-magnitude entries dropped as outliers")
EPSILON = ParamSpec("epsilon", 0.15, per_model=True, low=0.0, high=0.5, search=(0.01, 0.2),
                    doc="half-width of the keep-probability range around density")
LAMBDA = ParamSpec("lambda", 1.0, low=0.0, search=(0.3, 1.5),
                   doc="scale of the merged task vector")
INT8_MASK = ParamSpec("int8_mask", False, kind="bool", per_layer=False,
                      doc="accepted for mergekit compatibility (memory hint, no effect on values)")


def _normalize(default: bool) -> ParamSpec:
    return ParamSpec("normalize", default, kind="bool", per_layer=False,
                     doc="divide by the sum of the weights of agreeing models")


def _rescale(default: bool) -> ParamSpec:
    return ParamSpec("rescale", default, kind="bool", per_layer=False,
                     doc="scale kept entries so the task vector keeps its L1 norm")


def _sparsify(delta: Tensor, how: str, i: int, generator: torch.Generator | None,
              rescale: bool, p: dict[str, Any]) -> Tensor:
    density = float(p["density"][i])
    if density >= 1.0:
        return delta
    if how == "magnitude":
        return delta * ops.magnitude_mask(delta, density)
    if how == "outliers":
        return delta * ops.outlier_mask(delta, density, float(p["gamma"][i]))
    if how == "random":
        kept = delta * ops.bernoulli_mask(delta, density, generator)
    elif how == "della":
        probs = ops.della_probabilities(delta, density, float(p["epsilon"][i]))
        kept = delta * torch.bernoulli(probs, generator=generator).bool()
    else:
        raise ValueError(f"unknown sparsification {how!r}")
    return ops.l1_rescale(kept, delta) if rescale else kept


def pipeline(x: Tensor, *, base: Tensor | None, sparsify: str, consensus: str | None,
             out: Tensor | None = None, generator: torch.Generator | None = None,
             **p: Any) -> Tensor:
    """The shared task-arithmetic pipeline (module docstring); ``p`` holds the params."""
    if base is None:
        raise ValueError("task arithmetic needs a base model")
    deltas = x - base
    rescale = bool(p.get("rescale", False))
    if sparsify != "none":
        for i in range(deltas.shape[0]):
            row = deltas[i]
            sparse = _sparsify(row, sparsify, i, generator, rescale, p)
            if sparse is not row:
                row.copy_(sparse)
    shape = (-1,) + (1,) * (deltas.dim() - 1)
    w = torch.tensor(p["weight"], dtype=deltas.dtype, device=deltas.device).view(shape)
    weighted = deltas.mul_(w)
    if consensus is not None:
        mask = ops.sign_consensus(weighted, consensus)
        mixed = (weighted * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if p["normalize"]:
        mixed /= divisor
    lam = float(p["lambda"])
    if lam != 1.0:
        mixed *= lam
    if out is None:
        return base + mixed
    if out.dtype == base.dtype:
        return torch.add(base, mixed, out=out)
    return out.copy_(base + mixed)


# name: (sparsify, consensus, normalize default, rescale default, extra params, summary)
_FAMILY: dict[str, tuple[str, str | None, bool, bool, tuple[ParamSpec, ...], str]] = {
    "task_arithmetic": ("none", None, False, False, (),
                        "Adds the weighted task vectors to the base."),
    "ties": ("magnitude", "sum", True, False, (DENSITY,),
             "TIES: trim each task vector to its largest entries, elect signs, "
             "average the agreeing entries."),
    "dare_linear": ("random", None, False, True, (DENSITY,),
                    "DARE: drop entries at random, rescale the rest, add linearly."),
    "dare_ties": ("random", "sum", False, True, (DENSITY,),
                  "DARE sparsification with TIES sign consensus."),
    "breadcrumbs": ("outliers", None, False, False, (DENSITY, GAMMA),
                    "Model Breadcrumbs: drop the largest outliers and the smallest "
                    "entries, add linearly."),
    "breadcrumbs_ties": ("outliers", "sum", False, False, (DENSITY, GAMMA),
                         "Model Breadcrumbs with TIES sign consensus."),
    "della": ("della", "sum", True, True, (DENSITY, EPSILON),
              "DELLA: drop entries with probabilities ranked by magnitude, rescale, "
              "TIES sign consensus."),
    "della_linear": ("della", None, False, True, (DENSITY, EPSILON),
                     "DELLA sparsification, added linearly."),
}

_FORMULA = {
    "none": "δᵢ = θᵢ - θ_base",
    "magnitude": "δᵢ = top-k(|θᵢ - θ_base|, k = ⌊density·n⌋)",
    "random": "δᵢ = Bernoulli(density) ⊙ (θᵢ - θ_base) [scaled to the original L1 norm]",
    "outliers": "δᵢ = keep the ⌊density·n⌋ entries below the top ⌊gamma·n⌋ by magnitude",
    "della": "δᵢ = Bernoulli(pᵢ) ⊙ (θᵢ - θ_base) [L1-rescaled], pᵢ ∈ [density-ε, density+ε] "
             "by magnitude rank in each row",
}


def _check_della(p: dict[str, Any]) -> str | None:
    for i, (d, e) in enumerate(zip(p["density"], p["epsilon"], strict=False)):
        if d < 1.0 and not (d - e > 0.0 and d + e < 1.0):
            return (f"model {i}: density ± epsilon must lie inside (0, 1), got density {d:g} "
                    f"and epsilon {e:g}; lower epsilon or move density away from 0 and 1")
    return None


def _make(name: str) -> MergeMethod:
    sparsify, consensus, norm, resc, extra, summary = _FAMILY[name]

    def fn(x: Tensor, **kw: Any) -> Tensor:
        return pipeline(x, sparsify=sparsify, consensus=consensus, **kw)

    fn.__name__ = name
    params = (WEIGHT, *extra, LAMBDA, _normalize(norm), INT8_MASK)
    if sparsify in ("random", "della"):
        params = (*params, _rescale(resc))
    sign = " with sign consensus (sum)" if consensus else ""
    formula = (f"{_FORMULA[sparsify]};  θ = θ_base + λ · Σᵢ wᵢ δᵢ{sign}"
               f"{' / Σ agreeing wᵢ' if norm else ''} (normalize default {norm})")
    return MergeMethod(name, fn, params, base="required", min_models=1,
                       random=sparsify in ("random", "della"), summary=summary,
                       formula=formula, normalize_sum=consensus is None,
                       check=_check_della if sparsify == "della" else None)


METHODS = tuple(_make(name) for name in _FAMILY)

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
                   doc="scale of this model's task vector", symbol="w", left_out=0.0)
DENSITY = ParamSpec("density", 1.0, per_model=True, low=0.0, low_open=True, high=1.0,
                    search=(0.1, 1.0), doc="fraction of each task vector's entries kept",
                    symbol="d")
GAMMA = ParamSpec("gamma", 0.01, per_model=True, low=0.0, high=1.0, search=(0.0, 0.1),
                  doc="fraction of largest-magnitude entries dropped as outliers", symbol="γ")
EPSILON = ParamSpec("epsilon", 0.15, per_model=True, low=0.0, high=0.5, search=(0.01, 0.1),
                    doc="half-width of the keep-probability range around density",
                    symbol="ε")
# DELLA needs density ± epsilon inside (0, 1): its searched densities stay clear of the ends.
DELLA_DENSITY = ParamSpec("density", 1.0, per_model=True, low=0.0, low_open=True, high=1.0,
                          search=(0.15, 0.85), doc=DENSITY.doc, symbol=DENSITY.symbol)
LAMBDA = ParamSpec("lambda", 1.0, search=(0.3, 1.5),
                   doc="scale of the merged task vector", symbol="λ")
INT8_MASK = ParamSpec("int8_mask", False, kind="bool", per_layer=False,
                      doc="accepted for mergekit compatibility (memory hint, no effect on values)")


def _normalize(default: bool) -> ParamSpec:
    return ParamSpec("normalize", default, kind="bool", per_layer=False,
                     doc="divide by the sum of the weights of agreeing models")


def _rescale(default: bool) -> ParamSpec:
    return ParamSpec("rescale", default, kind="bool", per_layer=False,
                     doc="scale kept entries so the task vector keeps its L1 norm")


def _sparsify_(delta: Tensor, how: str, i: int, generator: torch.Generator | None,
               rescale: bool, ranks: Tensor | None, p: dict[str, Any]) -> None:
    """Sparsifies one task vector in place."""
    density = float(p["density"][i])
    if density >= 1.0:
        return
    rank = None if ranks is None else ranks[i]
    original = delta.clone() if rescale else None
    if how == "magnitude":
        delta.mul_(ops.magnitude_mask(delta, density, rank))
    elif how == "outliers":
        delta.mul_(ops.outlier_mask(delta, density, float(p["gamma"][i]), rank))
    elif how == "random":
        delta.mul_(ops.bernoulli_mask(delta, density, generator))
    elif how == "della":
        probs = ops.della_probabilities(delta, density, float(p["epsilon"][i]), rank)
        delta.mul_(ops.bernoulli_mask(delta, probs, generator))
    else:
        raise ValueError(f"unknown sparsification {how!r}")
    if original is not None:
        delta.copy_(ops.l1_rescale(delta, original))


def _rowsum(rows: Tensor) -> Tensor:
    """Sum over dim 0 by sequential adds (faster than ``sum(0)`` for a few rows)."""
    total = rows[0].clone()
    for i in range(1, rows.shape[0]):
        total.add_(rows[i])
    return total


def _consensus_mix(weighted: Tensor, w: list[float], method: str) -> tuple[Tensor, Tensor]:
    """Sum of the entries agreeing with the elected sign, and the sum of their weights.

    The elected sign ``e`` is +1 where the sum (``sum``) or the sign count (``count``)
    is >= 0, else -1; zero entries never agree. With ``e = ±1``, an entry ``r`` agrees
    iff ``r·e > 0``, so ``Σ r·[agree] = e · Σ max(r·e, 0)``: no masks are stored.
    """
    total = _rowsum(weighted) if method == "sum" else _rowsum(torch.sign(weighted))
    # copysign keeps +0 -> +1 (mergekit elects + on a zero sum); a -0 sum only arises
    # when every entry is zero, where no entry agrees either way.
    elected = torch.copysign(torch.ones((), dtype=total.dtype, device=total.device), total)
    mixed = torch.zeros_like(total)
    divisor = torch.zeros_like(total)
    for i in range(weighted.shape[0]):
        agreeing = torch.mul(weighted[i], elected).clamp_(min=0)
        mixed.add_(agreeing)
        divisor.add_(agreeing > 0, alpha=w[i])
    mixed.mul_(elected)
    divisor.masked_fill_(divisor == 0, 1)
    return mixed, divisor


def pipeline(x: Tensor, *, base: Tensor | None, sparsify: str, consensus: str | None,
             out: Tensor | None = None, generator: torch.Generator | None = None,
             ranks: Tensor | None = None, **p: Any) -> Tensor:
    """The shared task-arithmetic pipeline (module docstring); ``p`` holds the params.

    ``ranks`` (optional, one int tensor per input) are each task vector's magnitude
    order as the method's ``ranks`` kind declares (``ops.RANKERS``); an executor that
    keeps them saves the selection or sorting work (same result either way).
    """
    if base is None:
        raise ValueError("task arithmetic needs a base model")
    deltas = torch.sub(x, base)
    rescale = bool(p.get("rescale", False))
    if sparsify != "none":
        for i in range(deltas.shape[0]):
            _sparsify_(deltas[i], sparsify, i, generator, rescale, ranks, p)
    weights = [float(v) for v in p["weight"]]
    shape = (-1,) + (1,) * (deltas.dim() - 1)
    w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device).view(shape)
    weighted = deltas.mul_(w)
    if consensus is not None:
        mixed, divisor = _consensus_mix(weighted, [float(v) for v in w.flatten()], consensus)
        if p["normalize"]:
            mixed.div_(divisor)
    else:
        mixed = _rowsum(weighted)
        total = float(w.sum())
        if p["normalize"]:
            mixed.div_(total if abs(total) >= 1e-8 else 1.0)
    lam = float(p["lambda"])
    if lam != 1.0:
        mixed.mul_(lam)
    if out is None:
        return mixed.add_(base)
    if out.dtype == base.dtype:
        return torch.add(base, mixed, out=out)
    return out.copy_(mixed.add_(base))


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
    "della": ("della", "sum", True, True, (DELLA_DENSITY, EPSILON),
              "DELLA: drop entries with probabilities ranked by magnitude, rescale, "
              "TIES sign consensus."),
    "della_linear": ("della", None, False, True, (DELLA_DENSITY, EPSILON),
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
    params = (WEIGHT, *extra, LAMBDA, _normalize(norm), INT8_MASK, _rescale(resc))
    sign = " with sign consensus (sum)" if consensus else ""
    formula = (f"{_FORMULA[sparsify]};  θ = θ_base + λ · Σᵢ wᵢ δᵢ{sign}"
               f"{' / Σ agreeing wᵢ' if norm else ''} (normalize default {norm})")
    return MergeMethod(name, fn, params, base="required", min_models=1,
                       ranks={"magnitude": "magnitude", "outliers": "magnitude",
                              "della": "row"}.get(sparsify),
                       random=sparsify in ("random", "della"), summary=summary,
                       formula=formula, normalize_sum=consensus is None,
                       check=_check_della if sparsify == "della" else None)


METHODS = tuple(_make(name) for name in _FAMILY)

"""Linear averaging ("model soup") and its interpolating cousins SLERP and NuSLERP."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from search.merge import ops
from search.merge.spec import MergeMethod, ParamSpec

WEIGHT = ParamSpec("weight", None, per_model=True, required=True, search=(0.0, 1.0),
                   doc="mixing weight of this model", symbol="w", left_out=0.0)
NORMALIZE_TRUE = ParamSpec("normalize", True, kind="bool", per_layer=False,
                           doc="divide by the sum of the weights")


def _into(out: Tensor | None, res: Tensor) -> Tensor:
    if out is None:
        return res
    out.copy_(res.reshape(out.shape))
    return out


def linear(x: Tensor, *, base: Tensor | None = None, out: Tensor | None = None,
           **params: Any) -> Tensor:
    """Weighted sum ``Σᵢ wᵢ xᵢ`` (divided by ``Σᵢ wᵢ`` if normalize), in float32.

    One matrix-vector product over the stacked inputs: every input byte is read once.
    """
    wd = ops.work_dtype(x.dtype)
    w = torch.tensor(params["weight"], dtype=wd, device=x.device)
    flat = x.reshape(x.shape[0], -1)
    flat = flat if flat.dtype == wd else flat.to(wd)
    if out is not None and out.dtype == wd and out.is_contiguous():
        torch.matmul(w.unsqueeze(0), flat, out=out.view(1, -1))
        if params["normalize"]:
            out.div_(w.sum())
        return out
    res = torch.matmul(w.unsqueeze(0), flat)
    if params["normalize"]:
        res.div_(w.sum())
    return _into(out, res.reshape(x.shape[1:]).to(x.dtype))


def slerp(x: Tensor, *, base: Tensor | None = None, out: Tensor | None = None,
          **params: Any) -> Tensor:
    """Spherical interpolation from the base (``t = 0``) to the other model (``t = 1``)."""
    if base is None:
        raise ValueError("slerp needs a base model")
    return _into(out, ops.slerp(float(params["t"]), base, x[0]))


def nuslerp(x: Tensor, *, base: Tensor | None = None, out: Tensor | None = None,
            **params: Any) -> Tensor:
    """SLERP of two models (or their task vectors, with a base) at ``t = w1 / (w0 + w1)``."""
    w0, w1 = params["weight"]
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    v0, v1 = (x[0], x[1]) if base is None else (x[0] - base, x[1] - base)
    res = ops.nuslerp(t, v0, v1, flatten=bool(params["nuslerp_flatten"]),
                      row_wise=bool(params["nuslerp_row_wise"]))
    if base is not None:
        res = res + base
    return _into(out, res)


METHODS = (
    MergeMethod(
        "linear", linear, (WEIGHT, NORMALIZE_TRUE), base="ignored", min_models=1,
        summary="Weighted average of the models (model soup). A base_model not listed in "
                "models is averaged in too, as in mergekit.",
        formula="θ = Σᵢ wᵢ θᵢ / Σᵢ wᵢ   (no division when normalize is false); float32",
        normalize_sum=True,
    ),
    MergeMethod(
        "slerp", slerp,
        (ParamSpec("t", None, required=True, low=0.0, high=1.0, search=(0.0, 1.0),
                   doc="interpolation factor: 0 = base, 1 = the other model", symbol="t"),),
        base="required", min_models=1, max_models=1,
        summary="Spherical interpolation between the base and one other model.",
        formula="θ = sin((1-t)Ω)/sin Ω · θ_base + sin(tΩ)/sin Ω · θ₁,  cos Ω = ⟨θ̂_base, θ̂₁⟩ "
                "(linear when |cos Ω| > 0.9995); float32",
    ),
    MergeMethod(
        "nuslerp", nuslerp,
        (ParamSpec("weight", None, per_model=True, required=True, search=(0.0, 1.0),
                   doc="relative weight; t = w₁ / (w₀ + w₁)", symbol="w", left_out=0.0),
         ParamSpec("nuslerp_flatten", True, kind="bool", per_layer=False,
                   doc="treat each tensor as one vector"),
         ParamSpec("nuslerp_row_wise", False, kind="bool", per_layer=False,
                   doc="when not flattened: interpolate the vectors along axis 0 "
                       "(columns of a matrix) instead of the last axis (rows)")),
        base="optional", min_models=2, max_models=2,
        summary="SLERP of exactly two models, or of their task vectors when a base is given.",
        formula="θ = base + slerp(t, θ₀ - base, θ₁ - base),  t = w₁/(w₀+w₁) (0.5 if the sum is 0)",
    ),
)

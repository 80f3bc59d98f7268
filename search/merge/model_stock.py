"""Model Stock: move from the base toward the average of the fine-tuned models by a
factor set by the angle between their task vectors."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from search.merge.spec import MergeMethod, ParamSpec


def model_stock(x: Tensor, *, base: Tensor | None = None, out: Tensor | None = None,
                **params: Any) -> Tensor:
    """``θ = t · mean(θᵢ) + (1 - t) · θ_base`` with ``t = N cos / (1 + (N - 1) cos)``,
    where ``cos`` is the mean pairwise cosine of the task vectors (per row when
    ``filter_wise``)."""
    if base is None:
        raise ValueError("model_stock needs a base model")
    n = x.shape[0]
    if params["filter_wise"]:
        b = base.unsqueeze(0) if base.dim() == 1 else base
        flat = x.reshape(n, *b.shape)
    else:
        b = base.reshape(-1)
        flat = x.reshape(n, -1)
    offsets = flat - b
    cos_all = []
    for i in range(n):
        for j in range(i + 1, n):
            denom = (offsets[i].norm(dim=-1) * offsets[j].norm(dim=-1)).clamp(min=1e-6)
            cos_all.append(((offsets[i] * offsets[j]).sum(dim=-1) / denom).clamp(-1, 1))
    cos = torch.stack(cos_all).mean(dim=0).unsqueeze(-1)
    denom = 1 + (n - 1) * cos
    t = torch.where(denom.abs() < 1e-6, torch.zeros_like(cos), (n * cos) / denom)
    res = (t * flat.mean(dim=0) + (1 - t) * b).reshape(base.shape)
    if out is None:
        return res
    return out.copy_(res)


METHODS = (
    MergeMethod(
        "model_stock", model_stock,
        (ParamSpec("filter_wise", False, kind="bool", per_layer=False,
                   doc="compute the angle per row instead of per tensor"),),
        base="required", min_models=2,
        summary="Model Stock: interpolate between the base and the average of the models "
                "by the angle between their task vectors.",
        formula="θ = t · mean(θᵢ) + (1-t) · θ_base,  t = N cos / (1 + (N-1) cos)",
    ),
)

"""Per-layer parameter values: tensor name -> depth, gradients, filters.

A tensor inside transformer block ``i`` of ``L`` sits at depth ``t = i / (L - 1)``
(``t = 1`` when there is one block). Tensors outside the blocks (embeddings, final
norm, LM head) take ``t = 0``, i.e. the first value of a gradient, as mergekit 0.1.5
does.

Example:
    >>> layer_index("model.layers.3.mlp.up_proj.weight")
    3
    >>> evaluate([0.0, 1.0], "model.layers.1.mlp.up_proj.weight", 0.25)
    0.25
    >>> evaluate([{"filter": "mlp", "value": 0.2}, {"value": 0.9}], "x.mlp.w", 0.0)
    0.2
"""

from __future__ import annotations

import math
import re
from typing import Any

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The transformer block a tensor belongs to, or ``None`` for other tensors."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def depth(name: str, num_layers: int) -> float:
    """The position ``t`` in [0, 1] used to interpolate per-layer values."""
    idx = layer_index(name)
    if idx is None:
        return 0.0
    return idx / (num_layers - 1) if num_layers > 1 else 1.0


def evaluate(value: Any, name: str, t: float) -> Any:
    """Resolves a recipe value for one tensor.

    A scalar is itself; a list of numbers is interpolated linearly at ``t`` (the
    list's entries are evenly spaced anchors from the first to the last layer); a
    list of ``{filter, value}`` conditions takes the first whose filter is a
    substring of ``name`` (or is absent or ``"*"``). ``None`` when none matches.
    """
    if isinstance(value, list):
        if value and isinstance(value[0], dict):
            for cond in value:
                if cond.get("filter") in (None, "*") or cond["filter"] in name:
                    return evaluate(cond["value"], name, t)
            return None
        if len(value) == 1:
            return value[0]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return value[int(t * (len(value) - 1))]  # bools/strings step, no blending
        scaled = t * (len(value) - 1)
        i0 = min(math.floor(scaled), len(value) - 1)
        i1 = min(i0 + 1, len(value) - 1)
        frac = scaled - i0
        return (1 - frac) * value[i0] + frac * value[i1]
    return value

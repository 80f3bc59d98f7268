"""Pure tensor primitives shared by the merge methods.

No I/O, no device moves, no NumPy: every function takes and returns tensors on the
caller's device. ``x`` is a stack of inputs with the model on dimension 0.

Example:
    >>> import torch
    >>> a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    >>> slerp(0.5, a, b)
    tensor([0.7071, 0.7071])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float type computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lerp(t: float, v0: Tensor, v1: Tensor) -> Tensor:
    """Linear interpolation ``(1 - t) * v0 + t * v1``."""
    return (1 - t) * v0 + t * v1


def slerp(t: float, v0: Tensor, v1: Tensor,
          dot_threshold: float = SLERP_DOT_THRESHOLD, eps: float = SLERP_EPS) -> Tensor:
    """Spherical interpolation of two whole tensors, each flattened to one vector.

    Computed in float32 (float64 for float64 inputs) and returned in the input dtype.
    The angle comes from the normalized vectors (a norm ``<= eps`` is not divided);
    the result interpolates the unnormalized tensors. Falls back to :func:`lerp` when
    ``|cos| > dot_threshold`` (nearly parallel or antiparallel).
    """
    wd = work_dtype(v0.dtype)
    a, b = v0.to(wd), v1.to(wd)
    if a.numel() == 0:
        return lerp(t, a, b).to(v0.dtype)
    na, nb = float(a.norm()), float(b.norm())
    dot = float((a / (na if na > eps else 1.0) * (b / (nb if nb > eps else 1.0))).sum())
    dot = min(1.0, max(-1.0, dot))
    if abs(dot) > dot_threshold:
        return lerp(t, a, b).to(v0.dtype)
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    s0 = math.sin((1 - t) * theta) / sin_theta
    s1 = math.sin(t * theta) / sin_theta
    return (s0 * a + s1 * b).to(v0.dtype)


def nuslerp(t: float, v0: Tensor, v1: Tensor, *, flatten: bool = True,
            row_wise: bool = False, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation of vectors along the last axis (rows of a matrix),
    along axis 0 when ``row_wise``, or of the whole tensor when ``flatten``.

    Computed in the input dtype. Colinear vectors (``1 - cos² <= eps²``) are
    interpolated linearly.
    """
    shape = v0.shape
    if flatten:
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    elif row_wise:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    a_u = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    b_u = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (a_u * b_u).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos * cos) <= eps * eps
    theta = torch.acos(cos)
    sin = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    res = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / sin
    res = torch.where(colinear, lerp(t, a, b), res)
    if not flatten and row_wise:
        res = res.transpose(0, -1)
    return res.reshape(shape)


def l1_rescale(masked: Tensor, original: Tensor, eps: float = 1e-7) -> Tensor:
    """Scales ``masked`` so its L1 norm matches ``original``'s (DARE/DELLA rescale).

    Left unscaled when either norm is below ``eps``.
    """
    before = float(original.abs().sum(dtype=torch.float32))
    after = float(masked.abs().sum(dtype=torch.float32))
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def _kth_largest(flat: Tensor, k: int) -> Tensor:
    """The k-th largest of non-negative values (1-based), by radix selection.

    Non-negative IEEE floats order like their bit patterns read as integers, so a
    histogram of the high bits finds the bucket holding the k-th value in one pass and
    a second histogram of the low bits inside that bucket finishes the job (float32;
    16-bit floats need one pass). Linear time, no sort.
    """
    if flat.dtype in (torch.float16, torch.bfloat16):
        bits = flat.view(torch.int16).to(torch.int32)
        hist = torch.bincount(bits, minlength=1 << 15)
        above = torch.cumsum(hist.flip(0), 0)
        idx = int(torch.searchsorted(above, torch.tensor(k, device=flat.device)))
        value = torch.tensor((1 << 15) - 1 - idx, dtype=torch.int16, device=flat.device)
        return value.view(flat.dtype)
    if flat.dtype != torch.float32:
        return torch.kthvalue(flat, flat.numel() - k + 1).values
    bits = flat.view(torch.int32)
    high = bits >> 16
    hist = torch.bincount(high, minlength=1 << 15)
    above = torch.cumsum(hist.flip(0), 0)
    idx = int(torch.searchsorted(above, torch.tensor(k, device=flat.device)))
    bucket = (1 << 15) - 1 - idx
    before = int(above[idx - 1]) if idx > 0 else 0
    low = bits[high == bucket] & 0xFFFF
    hist2 = torch.bincount(low, minlength=1 << 16)
    above2 = torch.cumsum(hist2.flip(0), 0)
    idx2 = int(torch.searchsorted(above2, torch.tensor(k - before, device=flat.device)))
    value = torch.tensor((bucket << 16) | ((1 << 16) - 1 - idx2), dtype=torch.int32,
                         device=flat.device)
    return value.view(torch.float32)


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask of exactly ``k`` largest non-negative ``scores``.

    Ties are broken by position (lower index first), so the kept set equals
    ``magnitude_ranks(scores) < k`` on every device.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    thr = _kth_largest(flat, k)
    mask = flat >= thr
    extra = int(mask.sum()) - k
    if extra > 0:  # more values equal the threshold than fit: keep the first ones
        ties = flat == thr
        keep = int(ties.sum()) - extra
        mask = (flat > thr) | (ties & (torch.cumsum(ties, 0) <= keep))
    return mask.reshape(scores.shape)


def magnitude_ranks(delta: Tensor) -> Tensor:
    """Each entry's position when ordered by magnitude, largest first, ties by index.

    ``magnitude_ranks(d) < k`` is the same mask as ``topk_mask(d.abs(), k)``.
    """
    flat = delta.reshape(-1).abs()
    order = torch.argsort(flat, descending=True, stable=True)
    ranks = torch.empty(flat.numel(), dtype=torch.int32, device=delta.device)
    ranks[order] = torch.arange(flat.numel(), dtype=torch.int32, device=delta.device)
    return ranks.reshape(delta.shape)


def magnitude_mask(delta: Tensor, density: float, ranks: Tensor | None = None) -> Tensor:
    """Keeps the ``max(1, int(density * numel))`` largest magnitudes (TIES)."""
    k = max(1, int(density * delta.numel()))
    if ranks is not None:
        return ranks < k
    return topk_mask(delta.abs(), k)


def outlier_mask(delta: Tensor, density: float, gamma: float,
                 ranks: Tensor | None = None) -> Tensor:
    """Model Breadcrumbs: keeps ``int(density * numel)`` values whose magnitude ranks
    lie just below the top ``int(gamma * numel)`` (the largest outliers and the
    smallest values are dropped)."""
    n = delta.numel()
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - keep - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    if ranks is not None:
        return (ranks >= n_top) & (ranks < n - n_bot)
    mag = delta.abs()
    return topk_mask(mag, n - n_bot) & ~topk_mask(mag, n_top)


def bernoulli_mask(delta: Tensor, density: float | Tensor,
                   generator: torch.Generator | None) -> Tensor:
    """Random keep mask, each entry kept with probability ``density`` (a number or a
    tensor of per-entry probabilities): ``uniform[0, 1) < density``."""
    draws = torch.rand(delta.shape, generator=generator, dtype=torch.float32,
                       device=delta.device)
    return draws < density


def sampling_dtype(t: Tensor) -> torch.dtype:
    """dtype of random draws: float32 on CPU (bfloat16 stays), the tensor's own on GPU."""
    if t.device.type != "cpu" or t.dtype == torch.bfloat16:
        return t.dtype
    return torch.float32


def row_ranks(delta: Tensor) -> Tensor:
    """Each entry's position when its row (dim 1; a 1-D tensor is one row) is ordered
    by magnitude, smallest first, ties by index."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    n = rows.shape[1]
    order = torch.argsort(rows.abs().float(), dim=1, stable=True)
    ranks = torch.empty(order.shape, dtype=torch.int32, device=delta.device)
    ranks.scatter_(1, order, torch.arange(n, dtype=torch.int32, device=delta.device)
                   .expand_as(order).contiguous())
    return ranks.reshape(delta.shape)


RANKERS = {"magnitude": magnitude_ranks, "row": row_ranks}


def della_probabilities(delta: Tensor, density: float, epsilon: float,
                        ranks: Tensor | None = None) -> Tensor:
    """DELLA keep probabilities: magnitudes ranked along each row (dim 1; a 1-D
    tensor is one row) mapped linearly onto ``[density - epsilon, density + epsilon]``,
    the smallest magnitude getting the lowest probability. ``ranks`` (from
    :func:`row_ranks`) skips the sort."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    n = rows.shape[1]
    ranks = row_ranks(delta) if ranks is None else ranks
    scaled = ranks.to(sampling_dtype(delta)) / max(n - 1, 1)
    probs = (density - epsilon) + scaled * (2 * epsilon)
    return probs.reshape(delta.shape)

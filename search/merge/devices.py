"""Devices and dtypes for merging: resolving ``auto``, dtype promotion, safe casts.

Example:
    >>> resolve_device("cpu")
    device(type='cpu')
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

from search.errors import NonFiniteMergeError, SoupError
from search.merge.plan import MergePlan, finite
from search.recipe import Recipe

DTYPE_BY_NAME = {"float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16, "float64": torch.float64}


def keep_freed_memory() -> bool:
    """Asks glibc to keep freed memory in the heap instead of returning it to the OS.

    Merging allocates large temporaries; by default glibc serves each one with a fresh
    memory map whose pages fault in on first touch, which costs several times the
    arithmetic. The process's memory then stays at its high-water mark instead of
    shrinking between tensors, so resident workers use it and ``soup merge`` (whose point
    is a small peak) does not: there it is faster but raises the peak. Figures:
    docs/benchmarks.md, heap tuning.
    Linux/glibc only; ``SOUP_MALLOC_TUNING=0`` disables it. Returns whether the setting
    was applied.
    """
    if os.environ.get("SOUP_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    ok = libc.mallopt(m_mmap_max, 0) == 1
    ok = libc.mallopt(m_trim_threshold, 2**31 - 1) == 1 and ok
    return libc.mallopt(m_top_pad, 64 << 20) == 1 and ok


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SoupError(f"device {device!r} requested but CUDA is not available here; use "
                        "cpu or auto (soup search: models.device=auto; soup merge and "
                        "export: --device auto)")
    try:
        return torch.device(device)
    except RuntimeError:
        raise SoupError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None


def promoted_dtype(recipe: Recipe, dtypes: list[torch.dtype]) -> torch.dtype:
    """Non-float tensors keep their dtype; floats take the recipe's ``dtype`` or the
    parents' dtypes promoted together."""
    dt = dtypes[0]
    if not dt.is_floating_point:
        return dt
    if recipe.dtype:
        return DTYPE_BY_NAME[recipe.dtype]
    for other in dtypes[1:]:
        dt = torch.promote_types(dt, other)
    return dt


def out_dtype(recipe: Recipe, work: torch.dtype) -> torch.dtype:
    return DTYPE_BY_NAME[recipe.out_dtype] if recipe.out_dtype else work


def check_cast(plan: MergePlan, name: str, out: torch.Tensor) -> None:
    """Casting to a narrower ``out_dtype`` must not overflow."""
    if not finite(out):
        raise NonFiniteMergeError(
            f"merged tensor {name} overflows {out.dtype} ({plan.method.name}); use a wider "
            "out_dtype or smaller weights"
        )

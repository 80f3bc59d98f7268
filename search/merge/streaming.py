"""Merging to disk: safetensors in, sharded safetensors out, tensor by tensor.

Peak memory is one output tensor plus one tensor per parent. The output folder
appears only when complete: everything is written into a hidden temporary folder
beside it, which is renamed at the end (and removed if anything fails).

Example:
    >>> from search.recipe import Recipe
    >>> merge_to_disk(Recipe.load("recipe.yaml"), "out")   # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from search.atomic import replace_folder
from search.errors import IncompatibleModelsError, NonFiniteMergeError, OutputExistsError, SoupError
from search.merge.plan import MergePlan, finite
from search.merge.safetensors_io import ShardedWriter
from search.merge.sources import (
    ModelSource,
    check_compatible,
    open_model,
    read_for_merge,
    tensor_dtype,
)
from search.recipe import Recipe

log = logging.getLogger(__name__)
DTYPE_BY_NAME = {"float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class MergeOptions:
    """How to run a merge (independent of what the recipe says).

    Attributes:
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        allow_pickle: load pickle checkpoints (they can run code).
        truncate_vocab: crop embeddings/LM heads to the smallest vocabulary.
        max_shard_bytes: output shard size.
        check_finite: fail on NaN/inf in merged tensors.
        force: replace an existing output folder.
    """

    device: str = "auto"
    allow_pickle: bool = False
    truncate_vocab: bool = False
    max_shard_bytes: int = 2 * 1024**3
    check_finite: bool = True
    force: bool = False


def keep_freed_memory() -> bool:
    """Asks glibc to keep freed memory in the heap instead of returning it to the OS.

    Merging allocates large temporaries; by default glibc serves each one with a fresh
    memory map whose pages fault in on first touch, which costs several times the
    arithmetic (measured: a 112 MB elementwise product took 44 ms, 9 ms with this).
    The process's memory then stays at its high-water mark instead of shrinking between
    tensors, so resident workers use it and ``soup merge`` (whose point is a small
    peak) does not: measured on SmolLM2 TIES, 25% faster but a 27% higher peak.
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


def work_dtype(recipe: Recipe, sources: list[ModelSource], name: str) -> torch.dtype:
    """The recipe's ``dtype``, else the parents' dtypes promoted (mergekit's rule)."""
    dts = [tensor_dtype(s, name) for s in sources]
    return promoted_dtype(recipe, dts)


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


@dataclass
class Prepared:
    """A validated merge: plan, opened parents, output shapes and parameters."""

    plan: MergePlan
    sources: dict[str, ModelSource]
    shapes: dict[str, tuple[int, ...]]
    params: dict[str, dict]

    @property
    def reference(self) -> ModelSource:
        """The model whose config, tokenizer and tensor order the output follows."""
        ref = self.plan.base or self.plan.recipe.base_model or self.plan.models[0]
        return self.sources.get(ref) or self.sources[self.plan.models[0]]

    def close(self) -> None:
        for s in self.sources.values():
            s.close()


def _check_same_tokenizer(sources: list[ModelSource]) -> None:
    """Embedding rows are merged by token id, so every parent must share one vocabulary.

    mergekit can re-map embeddings between tokenizers (``tokenizer_source``); soupsearch
    does not, so different ``tokenizer.json`` files are an error.
    """
    seen: dict[str, str] = {}
    for src in sources:
        path = src.folder / "tokenizer.json"
        try:
            data = json.loads(path.read_text())
            vocab = [data["model"].get("vocab"), [(t.get("id"), t.get("content"))
                                                  for t in data.get("added_tokens", [])]]
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            continue  # no (readable) fast tokenizer: nothing to compare
        key = hashlib.sha256(json.dumps(vocab, sort_keys=True).encode()).hexdigest()
        seen.setdefault(key, src.ref)
    if len(seen) > 1:
        a, b = list(seen.values())[:2]
        raise IncompatibleModelsError(
            f"models {a!r} and {b!r} have different tokenizers; merge only models that share "
            "a tokenizer (soupsearch does not re-map embeddings between vocabularies)"
        )


def prepare(recipe: Recipe, options: MergeOptions) -> Prepared:
    """All validation, before any tensor is read."""
    plan = MergePlan.build(recipe)
    if recipe.tokenizer_source == "union":
        raise SoupError("tokenizer_source: union is not supported; use 'base' or a model "
                        "path whose tokenizer all parents share")
    sources = {m: open_model(m, allow_pickle=options.allow_pickle) for m in plan.models}
    _check_same_tokenizer(list(sources.values()))
    ordered = [sources[m] for m in ([plan.base] if plan.base else []) + list(plan.inputs)]
    shapes = check_compatible(ordered, options.truncate_vocab)
    params = plan.resolve_all(list(shapes), ordered[0].num_layers)
    return Prepared(plan, sources, shapes, params)


def merge_tensor(prep: Prepared, name: str, device: torch.device,
                 check_finite: bool) -> torch.Tensor:
    """Reads one tensor from every parent and merges it on ``device``."""
    plan, shape = prep.plan, prep.shapes[name]
    srcs = [prep.sources[m] for m in plan.models]
    wd = work_dtype(plan.recipe, srcs, name)
    x = torch.stack([read_for_merge(prep.sources[m], name, shape) for m in plan.inputs])
    x = x.to(device=device, dtype=wd if x.is_floating_point() else x.dtype)
    base = None
    if plan.base:
        base = read_for_merge(prep.sources[plan.base], name, shape).to(device=device, dtype=wd)
    res = plan.run(name, prep.params[name], x, base, check_finite=check_finite)
    if not res.is_floating_point():
        return res
    out = res.to(out_dtype(plan.recipe, wd))
    if check_finite and out.dtype != res.dtype:
        check_cast(plan, name, out)
    return out


def check_cast(plan: MergePlan, name: str, out: torch.Tensor) -> None:
    """Casting to a narrower ``out_dtype`` must not overflow."""
    if not finite(out):
        raise NonFiniteMergeError(
            f"merged tensor {name} overflows {out.dtype} ({plan.method.name}); use a wider "
            "out_dtype or smaller weights"
        )


def merge_to_disk(recipe: Recipe, out_dir: str | os.PathLike[str],
                  options: MergeOptions | None = None) -> Path:
    """Merges ``recipe`` into a Hugging Face model folder at ``out_dir``.

    Returns the output folder. Raises :class:`SoupError` subclasses for bad input.
    """
    opts = options or MergeOptions()
    out = Path(out_dir)
    if out.exists() and not opts.force:
        raise OutputExistsError(f"output folder {str(out)!r} exists; choose another "
                                "or pass --force to replace it")
    device = resolve_device(opts.device)
    prep = prepare(recipe, opts)
    for src in prep.sources.values():
        folder = src.folder.resolve()
        if folder == out.resolve() or out.resolve() in folder.parents:
            prep.close()
            raise OutputExistsError(f"output folder {str(out)!r} holds parent {src.ref!r}; "
                                    "write the merge somewhere else")
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    writer: ShardedWriter | None = None
    try:
        tmp.mkdir(parents=True)
        names = list(prep.shapes)
        srcs = list(prep.sources.values())
        specs = []
        for n in names:
            wd = work_dtype(recipe, srcs, n)
            dt = out_dtype(recipe, wd) if wd.is_floating_point else wd
            specs.append((n, dt, prep.shapes[n]))
        writer = ShardedWriter(tmp, specs, opts.max_shard_bytes)
        for n in names:
            writer.write(n, merge_tensor(prep, n, device, opts.check_finite))
        writer.close()
        from search.merge.model_files import write_model_files

        write_model_files(prep, tmp, specs)
        replace_folder(tmp, out, opts.force, "output folder")
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        prep.close()
    log.info("merged %d tensors into %s in %.2fs", len(prep.shapes), out, time.perf_counter() - t0)
    return out

"""Merging to disk: safetensors in, sharded safetensors out, tensor by tensor.

Peak memory is one output tensor plus one tensor per parent. The output folder
appears only when complete: everything is written into a hidden temporary folder
beside it, which is renamed at the end (and removed if anything fails).

Example:
    >>> import tempfile
    >>> from tests.families import save_family
    >>> from search.recipe import Recipe
    >>> tmp = tempfile.TemporaryDirectory()
    >>> a, b = (str(p) for p in save_family(tmp.name, n_experts=1).values())
    >>> recipe = Recipe.from_dict({"merge_method": "linear", "models": [{"model": a},
    ...                            {"model": b}], "parameters": {"weight": 0.5}})
    >>> out = merge_to_disk(recipe, Path(tmp.name) / "merged")
    >>> (out / "config.json").is_file()
    True
    >>> tmp.cleanup()
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from search.atomic import replace_folder
from search.errors import IncompatibleModelsError, OutputExistsError, SoupError
from search.merge.devices import (
    check_cast,
    out_dtype,
    promoted_dtype,
    resolve_device,
)
from search.merge.model_files import Prepared, write_model_files
from search.merge.plan import MergePlan
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


def work_dtype(recipe: Recipe, sources: list[ModelSource], name: str) -> torch.dtype:
    """The recipe's ``dtype``, else the parents' dtypes promoted (mergekit's rule)."""
    dts = [tensor_dtype(s, name) for s in sources]
    return promoted_dtype(recipe, dts)


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

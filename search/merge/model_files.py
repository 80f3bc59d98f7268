"""Everything in a merged model folder besides the weights: config, tokenizer,
generation config, the recipe, and a model card."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from search.merge.devices import DTYPE_BY_NAME
from search.merge.plan import MergePlan
from search.merge.sources import ModelSource

log = logging.getLogger(__name__)
_TORCH_NAME = {v: k for k, v in DTYPE_BY_NAME.items()}


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


def output_config(prep: Prepared, dtype: torch.dtype) -> dict[str, Any]:
    """The reference model's config with the output dtype and vocabulary size."""
    cfg = dict(prep.reference.config)
    cfg["torch_dtype"] = _TORCH_NAME.get(dtype, str(dtype))
    if "dtype" in cfg:
        cfg["dtype"] = cfg["torch_dtype"]
    if "lm_head.weight" in prep.shapes and cfg.get("tie_word_embeddings", True):
        cfg["tie_word_embeddings"] = False  # some parent has its own head: so does the merge
    for name, shape in prep.shapes.items():
        is_embed = "embed_tokens" in name or name.endswith("wte.weight")
        if is_embed and cfg.get("vocab_size") and shape[0] < int(cfg["vocab_size"]):
            cfg["vocab_size"] = shape[0]
    return cfg


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "chat_template.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json")


def _copy_tokenizer(source: str, folder: Path) -> None:
    """Copies the tokenizer files byte for byte (falls back to transformers' loader)."""
    src = Path(source)
    found = [src / f for f in _TOKENIZER_FILES if (src / f).is_file()]
    if found:
        for f in found:
            shutil.copyfile(f, folder / f.name)
        return
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        log.warning("no tokenizer copied from %s (%s)", source, exc)
        return
    tok.save_pretrained(folder)


def _copy_generation_config(source: Path, folder: Path) -> None:
    gen = source / "generation_config.json"
    if gen.is_file():
        (folder / "generation_config.json").write_text(gen.read_text())


def model_card(prep: Prepared) -> str:
    """A README.md naming the parents and holding the recipe."""
    r = prep.plan.recipe
    parents = "\n".join(f"- `{m}`" for m in prep.plan.models)
    return (
        "---\ntags: [merge, soupsearch]\n---\n\n"
        f"# Merged model ({r.merge_method})\n\n"
        f"Made by [soupsearch](https://pypi.org/project/soupsearch/) with `{r.merge_method}`"
        f"{f' on base `{r.base_model}`' if r.base_model else ''}.\n\n"
        f"## Parents\n\n{parents}\n\n"
        "## Recipe\n\nmergekit-compatible (also saved as `recipe.yaml`); "
        f"canonical hash `{r.hash()}`.\n\n```yaml\n{r.to_yaml()}```\n"
    )


def write_model_files(prep: Prepared, folder: Path,
                      specs: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
    """Writes config, tokenizer, generation config, recipe and model card."""
    float_dtypes = [d for _, d, _ in specs if d.is_floating_point]
    dtype = max(set(float_dtypes), key=float_dtypes.count) if float_dtypes else torch.float32
    cfg = output_config(prep, dtype)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    recipe = prep.plan.recipe
    tok_src = recipe.tokenizer_source
    if tok_src in (None, "base"):
        tok_src = prep.reference.ref
    _copy_tokenizer(str(prep.sources[tok_src].folder) if tok_src in prep.sources else tok_src,
                    folder)
    _copy_generation_config(prep.reference.folder, folder)
    recipe.save(folder / "recipe.yaml")
    (folder / "README.md").write_text(model_card(prep))

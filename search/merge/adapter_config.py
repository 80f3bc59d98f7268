"""Reading and checking a PEFT adapter's ``adapter_config.json``: its type, options,
recorded base and per-module scaling (``alpha / r``, rsLoRA, rank and alpha patterns).

Example:
    >>> lora_scaling({"r": 8, "lora_alpha": 16}, "model.layers.0.q_proj", 8, "a")
    2.0
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search.errors import AdapterError

CONFIG_NAME = "adapter_config.json"
_SOFT_PROMPTS = {"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING",
                 "ADAPTION_PROMPT", "CPT"}
FOLD_FIRST = ("fold it into its base with PEFT's merge_and_unload(), save the full model "
               "with save_pretrained and list that folder as the parent instead")
# LoRA options whose merge is not a fixed additive update of the stored weights.
_UNSUPPORTED_OPTIONS = {
    "use_qalora": "QA-LoRA pools the input features",
    "alora_invocation_tokens": "activated LoRA only applies after its invocation tokens",
    "layer_replication": "layer replication changes the architecture",
    "trainable_token_indices": "trainable tokens are stored as sparse embedding rows",
    "target_parameters": "LoRA on raw parameters (MoE experts) is not read yet",
    "use_bdlora": "BD-LoRA shares factors across layers",
    "arrow_config": "Arrow routes between several adapters per token",
}


def check_type(ref: str, config: Mapping[str, Any]) -> None:
    """Raises :class:`AdapterError` unless ``config`` describes a LoRA adapter we can
    merge as a weight update."""
    kind = str(config.get("peft_type", "")).upper()
    if kind in _SOFT_PROMPTS:
        raise AdapterError(
            f"adapter {ref!r} is a {kind} adapter: it learns virtual prompt tokens, not a "
            "change of the model's weights, so it has no task vector to merge; use LoRA "
            "adapters or full fine-tuned models as parents"
        )
    if kind == "IA3":
        raise AdapterError(
            f"adapter {ref!r} is an IA3 adapter: it learns multiplicative scaling vectors "
            "on activations, not an additive weight update, so weight merges cannot combine "
            f"it with other parents; {FOLD_FIRST}"
        )
    if kind != "LORA":
        raise AdapterError(
            f"adapter {ref!r} has peft_type {kind or 'missing'!s}; soupsearch reads LoRA "
            f"adapters (including DoRA, rsLoRA and QLoRA-trained ones); {FOLD_FIRST}"
        )
    for option, why in _UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise AdapterError(f"adapter {ref!r} sets {option}: {why}, which has no plain "
                               f"weight update soupsearch can compute; {FOLD_FIRST}")


def check_base_name(ref: str, config: Mapping[str, Any], model_ref: str) -> None:
    """The base recorded in the adapter must be the model it is applied to.

    Accepted as the same model: the same string, the same local folder, or the same
    final path component (``org/SmolLM2-135M`` and ``/models/SmolLM2-135M``). A missing
    record is accepted (the shape checks still apply).
    """
    recorded = config.get("base_model_name_or_path")
    if not recorded:
        return
    recorded = str(recorded)
    if recorded == model_ref:
        return
    a, b = Path(recorded).expanduser(), Path(model_ref).expanduser()
    if a.exists() and b.exists() and a.resolve() == b.resolve():
        return
    if a.name and a.name.lower() == b.name.lower():
        return
    raise AdapterError(
        f"adapter {ref!r} was trained on {recorded!r} (base_model_name_or_path in its "
        f"{CONFIG_NAME}) but is applied to {model_ref!r}; apply it to the model it was "
        f"trained on, or, if {model_ref!r} is that model under another name, set "
        f"base_model_name_or_path to {model_ref!r} in {CONFIG_NAME}"
    )


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scaling(config: Mapping[str, Any], module: str, rank: int, ref: str) -> float:
    r = int(_pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank)))
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module,
                                 config.get("lora_alpha", r)))
    if r != rank:
        raise AdapterError(f"adapter {ref!r}: module {module} has rank {rank} in its weights "
                           f"but {r} in {CONFIG_NAME}; the adapter files do not match")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


@dataclass(frozen=True)
class AdapterFiles:
    """Where an adapter's files are (``weights`` or ``pickled`` may be missing)."""

    ref: str
    config: Path
    weights: Path | None
    pickled: Path | None


def read_config(files: AdapterFiles) -> dict[str, Any]:
    """The parsed ``adapter_config.json``."""
    try:
        data = json.loads(files.config.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise AdapterError(f"adapter {files.ref!r}: {CONFIG_NAME} is not valid JSON; "
                           "re-save the adapter") from None
    if not isinstance(data, dict):
        raise AdapterError(f"adapter {files.ref!r}: {CONFIG_NAME} is not a JSON object")
    return data

"""PEFT LoRA adapters as parents: a parent's weights computed from low-rank factors.

A parent written ``MODEL+ADAPTER`` (mergekit's syntax) is ``MODEL`` with the LoRA
adapter folder ``ADAPTER`` merged in, tensor by tensor, exactly as PEFT's
``merge_and_unload()`` computes it: ``W + (B @ A) * scaling`` (``alpha / r``, or
``alpha / sqrt(r)`` for rsLoRA; per-module ``rank_pattern``/``alpha_pattern``;
transposed for ``fan_in_fan_out`` and embedding LoRA), with DoRA's magnitude rescaling,
``lora_bias``, trained biases and ``modules_to_save`` replacements. Adapters trained
with QLoRA are plain LoRA adapters on disk and read the same way. Only the factors are
held; a full expert is never built in memory or on disk.

The adapter is checked against the model it is applied to: the base name recorded in
``adapter_config.json``, every changed tensor's name and shape, and the adapter type
(prompt tuning, prefix tuning, IA3 and the like have no additive weight update).

Example:
    >>> split_ref("org/base+./lora_math")
    ('org/base', './lora_math')
    >>> split_ref("org/base")
    ('org/base', None)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from search.errors import AdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
_PREFIX = "base_model.model."
_SOFT_PROMPTS = {"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING",
                 "ADAPTION_PROMPT", "CPT"}
_FOLD_FIRST = ("fold it into its base with PEFT's merge_and_unload(), save the full model "
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


def split_ref(ref: str) -> tuple[str, str | None]:
    """``"MODEL+ADAPTER"`` -> ``(MODEL, ADAPTER)``; a plain reference -> ``(ref, None)``.

    A reference that is an existing path is never split, so folder names containing
    ``+`` still work as plain models.
    """
    if "+" not in ref or Path(ref).exists():
        return ref, None
    model, _, adapter = ref.partition("+")
    if not model or not adapter:
        raise AdapterError(f"model {ref!r}: write an adapter parent as MODEL+ADAPTER "
                           "(both parts non-empty), e.g. ./base+./lora_math")
    return model, adapter


@dataclass(frozen=True)
class LowRank:
    """One tensor's low-rank update, as PEFT's LoRA layer stores it.

    Attributes:
        a: ``lora_A`` (``[r, in]``; ``[r, vocab]`` for embeddings).
        b: ``lora_B`` (``[out, r]``; ``[dim, r]`` for embeddings).
        scaling: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        transpose: the update is ``(B @ A).T`` (``fan_in_fan_out`` layers, embeddings).
        magnitude: DoRA's per-output magnitude vector, else ``None``.
        cast_first: the update is cast to the weight's dtype before the addition (PEFT's
            embedding merge) instead of adding in the promoted dtype (its linear merge).
    """

    a: Tensor
    b: Tensor
    scaling: float
    transpose: bool = False
    magnitude: Tensor | None = None
    cast_first: bool = False

    def delta(self) -> Tensor:
        """``(B @ A) * scaling`` in ``B``'s dtype (computed in float32 for half
        precision on CPU, as PEFT does)."""
        a, b = self.a, self.b
        cast = b.device.type == "cpu" and b.dtype in (torch.float16, torch.bfloat16)
        if cast:
            a, b = a.float(), b.float()
        prod = b @ a
        out = (prod.T if self.transpose else prod) * self.scaling
        return out.to(self.b.dtype) if cast else out

    def apply(self, weight: Tensor) -> Tensor:
        """``weight`` with this update merged in (a new tensor, ``weight``'s dtype)."""
        delta = _crop(self.delta(), weight.shape)
        if self.magnitude is None:
            out = weight.clone()
            out += delta.to(weight.dtype) if self.cast_first else delta
            return out
        # DoRA: rescale each output row of W + dW to the learned magnitude.
        w_t = weight.T if self.transpose else weight
        d_t = delta.T if self.transpose else delta
        summed = w_t + d_t
        norm = torch.linalg.norm(summed, dim=1).to(summed.dtype)
        factor = (self.magnitude / norm).view(-1, 1)
        factor = factor.T if self.transpose else factor
        return (factor * (weight + delta)).to(weight.dtype)

    def to(self, device: torch.device) -> LowRank:
        mag = None if self.magnitude is None else self.magnitude.to(device)
        return LowRank(self.a.to(device), self.b.to(device), self.scaling, self.transpose, mag,
                       self.cast_first)

    @property
    def nbytes(self) -> int:
        parts = [self.a, self.b] + ([self.magnitude] if self.magnitude is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)


def _crop(t: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    if tuple(t.shape) == tuple(shape):
        return t
    return t[tuple(slice(0, d) for d in shape)]


@dataclass
class Adapter:
    """A LoRA adapter's updates, keyed by the tensor names of the model it applies to.

    Attributes:
        ref: the adapter's folder or hub id.
        config: the parsed ``adapter_config.json``.
        updates: tensor name -> low-rank update.
        replaced: tensor name -> a full tensor the adapter stores instead of the
            model's (``modules_to_save``, trained biases, saved embedding layers).
        bias_updates: tensor name -> an additive bias update (``lora_bias``).
        alias: logical name -> stored name (a tied LM head reads the embeddings').
    """

    ref: str
    config: dict[str, Any]
    updates: dict[str, LowRank] = field(default_factory=dict)
    replaced: dict[str, Tensor] = field(default_factory=dict)
    bias_updates: dict[str, Tensor] = field(default_factory=dict)
    alias: dict[str, str] = field(default_factory=dict)

    def touches(self, name: str) -> bool:
        """Whether the adapter changes tensor ``name`` at all."""
        key = self._key(name)
        return key in self.updates or key in self.replaced or key in self.bias_updates

    def _key(self, name: str) -> str:
        if name in self.updates or name in self.replaced or name in self.bias_updates:
            return name
        return self.alias.get(name, name)

    def apply(self, name: str, weight: Tensor) -> Tensor:
        """The adapted model's tensor ``name``, given the model's own ``weight``.

        Returns ``weight`` itself when the adapter leaves the tensor unchanged.
        """
        key = self._key(name)
        out = weight
        if key in self.replaced:
            out = _crop(self.replaced[key], weight.shape).to(weight.device, weight.dtype)
        if key in self.updates:
            out = self.updates[key].apply(out)
        if key in self.bias_updates:
            out = out.clone() if out is weight else out
            out += _crop(self.bias_updates[key], weight.shape)
        return out

    def to(self, device: torch.device) -> Adapter:
        """The same adapter with its tensors on ``device``."""
        return Adapter(self.ref, self.config, {k: u.to(device) for k, u in self.updates.items()},
                       {k: t.to(device) for k, t in self.replaced.items()},
                       {k: t.to(device) for k, t in self.bias_updates.items()}, dict(self.alias))

    @property
    def nbytes(self) -> int:
        """Bytes held by the factors and replacement tensors."""
        tensors = [*self.replaced.values(), *self.bias_updates.values()]
        return (sum(u.nbytes for u in self.updates.values())
                + sum(t.numel() * t.element_size() for t in tensors))


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
            f"it with other parents; {_FOLD_FIRST}"
        )
    if kind != "LORA":
        raise AdapterError(
            f"adapter {ref!r} has peft_type {kind or 'missing'!s}; soupsearch reads LoRA "
            f"adapters (including DoRA, rsLoRA and QLoRA-trained ones); {_FOLD_FIRST}"
        )
    for option, why in _UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise AdapterError(f"adapter {ref!r} sets {option}: {why}, which has no plain "
                               f"weight update soupsearch can compute; {_FOLD_FIRST}")


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


def _scaling(config: Mapping[str, Any], module: str, rank: int, ref: str) -> float:
    r = int(_pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank)))
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module,
                                 config.get("lora_alpha", r)))
    if r != rank:
        raise AdapterError(f"adapter {ref!r}: module {module} has rank {rank} in its weights "
                           f"but {r} in {CONFIG_NAME}; the adapter files do not match")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _load_state(ref: str, weights: Path | None, pickled: Path | None,
                allow_pickle: bool) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if weights is not None:
        try:
            return load_file(str(weights))
        except Exception as exc:
            raise AdapterError(f"adapter {ref!r}: cannot read {weights.name} ({exc}); "
                               "re-save it with save_pretrained") from None
    if pickled is None:
        raise AdapterError(f"adapter {ref!r} has no {WEIGHTS_NAME}; save it with PEFT's "
                           "save_pretrained (safetensors is the default)")
    if not allow_pickle:
        raise AdapterError(f"adapter {ref!r} only has pickle weights ({PICKLE_NAME}), which "
                           "can run code when loaded; re-save it as safetensors or pass "
                           "--allow-pickle (models.allow_pickle=true) if you trust it")
    return dict(torch.load(pickled, map_location="cpu", weights_only=True))


def _group(ref: str, state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Adapter keys grouped by module: module -> {part: tensor}."""
    groups: dict[str, dict[str, Tensor]] = {}
    parts = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_embedding_A",
             "lora_embedding_B", "lora_magnitude_vector", "base_layer.weight",
             "base_layer.bias", "weight", "bias")
    for key, t in state.items():
        name = key.removeprefix(_PREFIX)
        for part in parts:
            if name.endswith("." + part):
                groups.setdefault(name[: -len(part) - 1], {})[part] = t
                break
        else:
            raise AdapterError(f"adapter {ref!r}: unexpected tensor {key} in its weights; "
                               "only LoRA adapters saved by PEFT are read")
    return groups


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


def load(files: AdapterFiles, model_ref: str, shapes: Mapping[str, tuple[int, ...]],
         alias: Mapping[str, str], allow_pickle: bool = False) -> Adapter:
    """Reads and validates an adapter against the model it is applied to.

    Args:
        files: the adapter's files.
        model_ref: the model it is applied to (checked against the recorded base).
        shapes: that model's stored tensor names and shapes.
        alias: logical tensor names the model stores under another name (tied head).
        allow_pickle: accept ``adapter_model.bin``.

    Raises:
        AdapterError: wrong adapter type, another base, or tensors that do not fit.
    """
    ref = files.ref
    config = read_config(files)
    check_type(ref, config)
    check_base_name(ref, config, model_ref)
    state = _load_state(ref, files.weights, files.pickled, allow_pickle)
    adapter = Adapter(ref, config, alias=dict(alias))
    for module, parts in _group(ref, state).items():
        _add_module(adapter, module, parts, shapes, model_ref)
    if not (adapter.updates or adapter.replaced or adapter.bias_updates):
        raise AdapterError(f"adapter {ref!r} holds no LoRA weights; is it a PEFT LoRA "
                           "adapter folder saved with save_pretrained?")
    return adapter


def _fit(adapter: Adapter, name: str, shape: tuple[int, ...],
         shapes: Mapping[str, tuple[int, ...]], model_ref: str) -> None:
    if name not in shapes:
        raise AdapterError(f"adapter {adapter.ref!r} changes tensor {name}, which "
                           f"{model_ref!r} does not have; the adapter was trained on a "
                           "different architecture")
    if tuple(shape) != tuple(shapes[name]):
        raise AdapterError(f"adapter {adapter.ref!r} changes tensor {name} with shape "
                           f"{list(shape)} but it is {list(shapes[name])} in {model_ref!r}; "
                           "the adapter was trained on a model of another size")


def _add_module(adapter: Adapter, module: str, parts: dict[str, Tensor],
                shapes: Mapping[str, tuple[int, ...]], model_ref: str) -> None:
    cfg, ref = adapter.config, adapter.ref
    weight, bias = f"{module}.weight", f"{module}.bias"
    for part, target in (("base_layer.weight", weight), ("weight", weight),
                         ("base_layer.bias", bias), ("bias", bias)):
        if part in parts:
            _fit(adapter, target, tuple(parts[part].shape), shapes, model_ref)
            adapter.replaced[target] = parts[part]
    magnitude = parts.get("lora_magnitude_vector")
    if "lora_A.weight" in parts and "lora_B.weight" in parts:
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        fifo = bool(cfg.get("fan_in_fan_out"))
        if a.dim() != 2 or b.dim() != 2:
            raise AdapterError(f"adapter {ref!r}: module {module} is not a linear LoRA "
                               "(convolution LoRA is not read); " + _FOLD_FIRST)
        shape = (a.shape[1], b.shape[0]) if fifo else (b.shape[0], a.shape[1])
        _fit(adapter, weight, shape, shapes, model_ref)
        scaling = _scaling(cfg, module, int(a.shape[0]), ref)
        if cfg.get("use_dora") and magnitude is None:
            raise AdapterError(f"adapter {ref!r} is a DoRA adapter but module {module} has "
                               "no magnitude vector; re-save the adapter")
        adapter.updates[weight] = LowRank(a, b, scaling, fifo, magnitude)
        if "lora_B.bias" in parts:
            _fit(adapter, bias, tuple(parts["lora_B.bias"].shape), shapes, model_ref)
            adapter.bias_updates[bias] = parts["lora_B.bias"] * scaling
    elif "lora_embedding_A" in parts and "lora_embedding_B" in parts:
        a, b = parts["lora_embedding_A"], parts["lora_embedding_B"]
        if magnitude is not None:
            raise AdapterError(f"adapter {ref!r}: DoRA on embedding {module} is not read; "
                               + _FOLD_FIRST)
        _fit(adapter, weight, (a.shape[1], b.shape[0]), shapes, model_ref)
        adapter.updates[weight] = LowRank(a, b, _scaling(cfg, module, int(a.shape[0]), ref),
                                          transpose=True, cast_first=True)
    elif any(p.startswith("lora_") for p in parts):
        raise AdapterError(f"adapter {ref!r}: module {module} has only {sorted(parts)}; "
                           "the adapter's weights are incomplete, re-save it")

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

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from search.errors import AdapterError
from search.merge.adapter_config import (
    FOLD_FIRST,
    AdapterFiles,
    check_base_name,
    check_type,
    lora_scaling,
    read_config,
)

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
_PREFIX = "base_model.model."
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
                               "(convolution LoRA is not read); " + FOLD_FIRST)
        shape = (a.shape[1], b.shape[0]) if fifo else (b.shape[0], a.shape[1])
        _fit(adapter, weight, shape, shapes, model_ref)
        scaling = lora_scaling(cfg, module, int(a.shape[0]), ref)
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
                               + FOLD_FIRST)
        _fit(adapter, weight, (a.shape[1], b.shape[0]), shapes, model_ref)
        adapter.updates[weight] = LowRank(a, b, lora_scaling(cfg, module, int(a.shape[0]), ref),
                                          transpose=True, cast_first=True)
    elif any(p.startswith("lora_") for p in parts):
        raise AdapterError(f"adapter {ref!r}: module {module} has only {sorted(parts)}; "
                           "the adapter's weights are incomplete, re-save it")

"""Parent models on disk: locate, inspect (headers only) and validate before merging.

Local folders and Hugging Face hub ids both resolve through transformers' own file
lookup (the hub cache, offline when ``HF_HUB_OFFLINE=1``). Weights are read from
safetensors; pickle checkpoints are refused unless ``allow_pickle`` is set.

Example:
    >>> open_model("/no/such/model")
    Traceback (most recent call last):
    ...
    search.errors.ModelNotFoundError: model '/no/such/model' not found: ...
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from search.errors import (
    AdapterError,
    IncompatibleModelsError,
    ModelNotFoundError,
    PickleCheckpointError,
)
from search.merge import adapter_config, adapters
from search.merge.adapter_config import CONFIG_NAME
from search.merge.safetensors_io import INDEX_NAME, SafetensorsFile

_PICKLE_INDEX = "pytorch_model.bin.index.json"
_PICKLE_SINGLE = "pytorch_model.bin"
VOCAB_TENSOR_HINTS = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out")


@dataclass
class ModelSource:
    """One parent: its folder, config, and tensor layout (read lazily, tensor by tensor).

    Attributes:
        ref: the name used in the recipe (path or hub id).
        folder: the local folder holding its files.
        config: the parsed ``config.json``.
        shapes: tensor name -> shape; dtypes: tensor name -> dtype.
    """

    ref: str
    folder: Path
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    _files: dict[str, SafetensorsFile] = field(default_factory=dict, repr=False)
    _pickled: dict[str, Tensor] | None = field(default=None, repr=False)

    @property
    def num_layers(self) -> int:
        cfg = self.config.get("text_config", self.config)
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in cfg:
                return int(cfg[key])
        raise IncompatibleModelsError(
            f"model {self.ref!r}: config.json has no num_hidden_layers/n_layer; "
            "is this a causal language model folder?"
        )

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", True))

    def read(self, name: str) -> Tensor:
        """One tensor, in new CPU memory, in the dtype stored on disk."""
        if self._pickled is not None:
            return self._pickled[name]
        return self._files[name].read(name)

    def close(self) -> None:
        for f in set(self._files.values()):
            f.close()


def _lookup(ref: str, filename: str) -> Path | None:
    local = Path(ref)
    if local.is_dir():
        p = local / filename
        return p if p.is_file() else None
    from transformers.utils import cached_file

    try:
        # Only the local cache: a merge never downloads (and never waits on retries).
        found = cached_file(ref, filename, local_files_only=True,
                            _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except Exception:
        return None
    return Path(found) if found else None


def _index_files(ref: str, index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise IncompatibleModelsError(f"model {ref!r}: {index.name} is not a valid weight "
                                      "index; re-save the model") from None
    files: dict[str, Path] = {}
    for fname in sorted(set(weight_map.values())):
        p = _lookup(ref, fname) if not Path(ref).is_dir() else index.parent / fname
        if p is None or not p.is_file():
            raise ModelNotFoundError(
                f"model {ref!r}: shard {fname} listed in its index is missing; "
                "re-download or re-save the model"
            )
        files[fname] = p
    return {name: files[f] for name, f in weight_map.items()}


class AdapterSource(ModelSource):
    """A parent written ``MODEL+ADAPTER``: ``MODEL``'s tensors with a LoRA adapter
    merged in as each one is read (see :mod:`search.merge.adapters`).

    Attributes:
        model: the model the adapter is applied to.
        adapter: the adapter's factors.
    """

    def __init__(self, ref: str, model: ModelSource, adapter: adapters.Adapter) -> None:
        super().__init__(ref, model.folder, model.config, dict(model.shapes),
                         dict(model.dtypes))
        self.model = model
        self.adapter = adapter
        for name, t in adapter.replaced.items():  # e.g. an LM head saved on a tied model
            self.shapes.setdefault(name, tuple(t.shape))
            self.dtypes.setdefault(name, model.dtypes.get(name, t.dtype))

    def read(self, name: str) -> Tensor:
        if name in self.model.shapes:
            return self.adapter.apply(name, self.model.read(name))
        return self.adapter.replaced[name].clone()

    def close(self) -> None:
        self.model.close()


def is_adapter(ref: str) -> bool:
    """Whether ``ref`` is a PEFT adapter folder (adapter_config.json, no config.json)."""
    return _lookup(ref, "config.json") is None and _lookup(ref, CONFIG_NAME) is not None


def open_adapter(ref: str, model: ModelSource, *, allow_pickle: bool = False
                 ) -> adapters.Adapter:
    """Reads adapter ``ref`` and checks it against ``model``, the model it modifies."""
    config = _lookup(ref, CONFIG_NAME)
    if config is None:
        where = ("the folder has no " + CONFIG_NAME if Path(ref).is_dir()
                 else "not a local folder and not in the Hugging Face cache")
        raise ModelNotFoundError(f"adapter {ref!r} not found: {where}; give the folder that "
                                 "PEFT's save_pretrained wrote")
    files = adapter_config.AdapterFiles(ref, config, _lookup(ref, adapters.WEIGHTS_NAME),
                                  _lookup(ref, adapters.PICKLE_NAME))
    emb = embed_name(model)
    alias = {HEAD: emb} if HEAD not in model.shapes and emb and model.tied_embeddings else {}
    return adapters.load(files, model.ref, model.shapes, alias, allow_pickle)


def open_model(ref: str, *, allow_pickle: bool = False) -> ModelSource:
    """Locates ``ref`` and reads its config and tensor headers (no weights).

    ``MODEL+ADAPTER`` opens ``MODEL`` with the LoRA adapter applied (its factors are
    read now; full tensors only as each is read).

    Raises:
        ModelNotFoundError: no local folder and nothing in the hub cache.
        PickleCheckpointError: only pickle weights and ``allow_pickle`` is false.
        AdapterError: the adapter cannot be applied to the model.
    """
    model_ref, adapter_ref = adapters.split_ref(ref)
    if adapter_ref is not None:
        if is_adapter(model_ref):
            raise AdapterError(f"model {ref!r}: {model_ref!r} is itself an adapter; write "
                               "BASE+ADAPTER with a full model first")
        model = open_model(model_ref, allow_pickle=allow_pickle)
        return AdapterSource(ref, model, open_adapter(adapter_ref, model,
                                                      allow_pickle=allow_pickle))
    cfg_path = _lookup(ref, "config.json")
    if cfg_path is None and _lookup(ref, CONFIG_NAME) is not None:
        raise AdapterError(
            f"model {ref!r} is a PEFT adapter (adapter_config.json), not a full model; "
            f"name the model it applies to as BASE+ADAPTER, e.g. 'BASE+{ref}' (in "
            "conf/models, adapters listed under experts are applied to models.base)"
        )
    if cfg_path is None:
        where = ("the folder has no config.json" if Path(ref).is_dir() else
                 "not a local folder and not in the Hugging Face cache")
        raise ModelNotFoundError(
            f"model {ref!r} not found: {where}; give a model folder path, or download the "
            "hub model first (soupsearch never downloads): huggingface-cli download <id>"
        )
    try:
        config = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise IncompatibleModelsError(f"model {ref!r}: config.json is not valid JSON; "
                                      "re-save the model") from None
    src = ModelSource(ref, cfg_path.parent, config)
    index = _lookup(ref, INDEX_NAME)
    single = _lookup(ref, "model.safetensors")
    if index is not None:
        by_name = _index_files(ref, index)
    elif single is not None:
        by_name = {n: single for n in SafetensorsFile(single).tensors}
    else:
        _open_pickle(src, allow_pickle)
        return src
    opened = {p: SafetensorsFile(p) for p in set(by_name.values())}
    for name, p in by_name.items():
        info = opened[p].tensors.get(name)
        if info is None:
            raise ModelNotFoundError(
                f"model {ref!r}: tensor {name} is in the index but not in {p.name}"
            )
        src._files[name] = opened[p]
        src.shapes[name] = info.shape
        src.dtypes[name] = info.dtype
    return src


def _open_pickle(src: ModelSource, allow_pickle: bool) -> None:
    index = _lookup(src.ref, _PICKLE_INDEX)
    single = _lookup(src.ref, _PICKLE_SINGLE)
    if index is None and single is None:
        raise ModelNotFoundError(
            f"model {src.ref!r} has no weights (no model.safetensors, no index); "
            "save it with save_pretrained(..., safe_serialization=True)"
        )
    if not allow_pickle:
        raise PickleCheckpointError(
            f"model {src.ref!r} only has pickle weights (pytorch_model.bin), which can run "
            "code when loaded; convert it to safetensors or pass --allow-pickle if you trust it"
        )
    files = sorted(set(_index_files(src.ref, index).values())) if index else [Path(str(single))]
    state: dict[str, Tensor] = {}
    for f in files:
        try:
            state.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except Exception as exc:
            raise IncompatibleModelsError(f"model {src.ref!r}: cannot load {f.name} ({exc}); "
                                          "convert it to safetensors") from None
    src._pickled = state
    src.shapes = {k: tuple(v.shape) for k, v in state.items()}
    src.dtypes = {k: v.dtype for k, v in state.items()}


def is_vocab_tensor(name: str) -> bool:
    """Whether a tensor is indexed by token id (embeddings, LM head)."""
    return any(h in name for h in VOCAB_TENSOR_HINTS)


def _arch(src: ModelSource) -> tuple[str, ...]:
    return (str(src.config.get("model_type")), *(src.config.get("architectures") or ()))


HEAD = "lm_head.weight"


def embed_name(src: ModelSource) -> str | None:
    """The token-embedding tensor's name, if the model has one we recognize."""
    return next((n for n in src.shapes if "embed_tokens" in n or n.endswith("wte.weight")
                 or "word_embeddings" in n), None)


def logical_tensors(src: ModelSource) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Tensor name -> (shape, dtype), with a tied LM head standing for the embeddings."""
    out = {n: (shape, src.dtypes[n]) for n, shape in src.shapes.items()}
    emb = embed_name(src)
    if HEAD not in out and src.tied_embeddings and emb is not None:
        out[HEAD] = out[emb]
    return out


def tensor_dtype(src: ModelSource, name: str) -> torch.dtype:
    """The stored dtype of ``name`` in ``src`` (a tied head reports its embeddings')."""
    if name in src.dtypes:
        return src.dtypes[name]
    return logical_tensors(src)[name][1]


def check_compatible(sources: list[ModelSource],
                     truncate_vocab: bool = False) -> dict[str, tuple[int, ...]]:
    """Checks that parents can be merged tensor by tensor.

    Returns the output shape of every tensor, in the first source's order, with vocab
    tensors cropped to the smallest vocabulary when ``truncate_vocab``. The output has
    an LM head when any parent stores one (parents with tied embeddings contribute their
    embeddings to it), as in mergekit.
    """
    ref = sources[0]
    ref_t = logical_tensors(ref)
    shapes = {n: s for n, (s, _) in ref_t.items()}
    for src in sources[1:]:
        if _arch(src)[0] != _arch(ref)[0]:
            raise IncompatibleModelsError(
                f"model {src.ref!r} is a {_arch(src)[0]} but {ref.ref!r} is a {_arch(ref)[0]}; "
                "merge only models fine-tuned from the same base"
            )
        if src.num_layers != ref.num_layers:
            raise IncompatibleModelsError(
                f"model {src.ref!r} has {src.num_layers} layers but {ref.ref!r} has "
                f"{ref.num_layers}; merge only models with the same architecture"
            )
        src_t = logical_tensors(src)
        missing, extra = sorted(set(ref_t) - set(src_t)), sorted(set(src_t) - set(ref_t))
        if missing or extra:
            what = f"lacks tensor {missing[0]}" if missing else f"has extra tensor {extra[0]}"
            raise IncompatibleModelsError(
                f"model {src.ref!r} {what} that {ref.ref!r} "
                f"{'has' if missing else 'lacks'}; the architectures differ"
            )
        for name, (shape, _) in ref_t.items():
            other = src_t[name][0]
            if other == shape:
                continue
            if is_vocab_tensor(name) and other[1:] == shape[1:]:
                if not truncate_vocab:
                    raise IncompatibleModelsError(
                        f"tensor {name}: vocabulary size {other[0]} in {src.ref!r} but "
                        f"{shape[0]} in {ref.ref!r}; use the same tokenizer, or pass "
                        "--truncate-vocab to keep the first rows common to all models"
                    )
                shapes[name] = (min(shapes[name][0], other[0]), *shape[1:])
                continue
            raise IncompatibleModelsError(
                f"tensor {name} has shape {list(other)} in {src.ref!r} but {list(shape)} in "
                f"{ref.ref!r}; merge only models with the same architecture"
            )
    if HEAD in shapes and not any(HEAD in s.shapes for s in sources):
        del shapes[HEAD]  # every parent ties its head: so does the output
    return shapes


def read_for_merge(src: ModelSource, name: str, shape: tuple[int, ...]) -> Tensor:
    """Reads ``name`` from ``src`` cropped to ``shape``; a tied LM head reads the
    embeddings."""
    if name not in src.shapes and name == HEAD:
        emb = embed_name(src)
        if emb is None:
            raise IncompatibleModelsError(f"model {src.ref!r} has no {HEAD} and no embeddings "
                                          "we recognize to tie it to")
        name = emb
    t = src.read(name)
    if tuple(t.shape) != tuple(shape):
        t = t[tuple(slice(0, d) for d in shape)]
    return t


"""Tiny models built locally (never downloaded) for tests, demos and benchmarks.

A byte-level tokenizer (every byte is a token) and small Llama / Qwen2 / GPT-2
configs; :func:`save_family` writes a base and "experts" that are the base plus small
seeded deltas, enough to exercise every merge path in seconds.

Example:
    >>> import tempfile
    >>> paths = save_family(tempfile.mkdtemp(), n_experts=2, arch="llama")
    >>> sorted(paths)
    ['base', 'expert_0', 'expert_1']
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SPECIALS = ("<pad>", "<s>", "</s>")


def byte_tokenizer() -> Any:
    """A fast tokenizer with one token per byte plus ``<pad>``, ``<s>``, ``</s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=512)


VOCAB_SIZE = 3 + 256


def tiny_config(arch: str = "llama", *, hidden: int = 32, layers: int = 2,
                vocab: int = VOCAB_SIZE, tie: bool = False) -> Any:
    """A small config of ``arch`` (``llama``, ``qwen2`` or ``gpt2``)."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common: dict[str, Any] = {"vocab_size": vocab, "tie_word_embeddings": tie,
                              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, **common)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    return cls(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               **common)


def save_family(folder: str | Path, *, n_experts: int = 3, arch: str = "llama",
                seed: int = 0, delta: float = 0.02, dtype: torch.dtype = torch.float32,
                **config_kw: Any) -> dict[str, Path]:
    """Writes ``base`` and ``expert_i`` (base + seeded Gaussian deltas) as HF folders."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(tiny_config(arch, **config_kw)).to(dtype)
    tok = byte_tokenizer()
    paths = {"base": folder / "base"}
    base.save_pretrained(paths["base"])
    tok.save_pretrained(paths["base"])
    gen = torch.Generator().manual_seed(seed + 1)
    for i in range(n_experts):
        expert = AutoModelForCausalLM.from_config(tiny_config(arch, **config_kw)).to(dtype)
        expert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in expert.parameters():
                noise = torch.randn(p.shape, generator=gen) * delta
                p.add_(noise.to(p.dtype))
        paths[f"expert_{i}"] = folder / f"expert_{i}"
        expert.save_pretrained(paths[f"expert_{i}"])
        tok.save_pretrained(paths[f"expert_{i}"])
    return paths

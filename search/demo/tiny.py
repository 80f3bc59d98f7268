"""Tiny models built locally (never downloaded) for tests, demos and benchmarks.

A byte-level tokenizer (every byte is a token) and small Llama / Qwen2 / GPT-2
configs (tests build whole families from them in ``tests/families.py``).

Example:
    >>> tiny_config("qwen2", hidden=32).num_key_value_heads
    2
"""

from __future__ import annotations

from typing import Any

SPECIALS = ("<pad>", "<s>", "</s>")
VOCAB_SIZE = len(SPECIALS) + 256


def byte_tokenizer() -> Any:
    """A fast tokenizer with one token per byte plus ``<pad>``, ``<s>``, ``</s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIALS, *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=512)


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

"""Tiny model families for tests and benchmarks: a base and "experts" that are the base plus
small seeded deltas (full checkpoints or PEFT adapters), enough to exercise every merge path
in seconds.

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     sorted(save_family(tmp, n_experts=2, arch="llama"))
    ['base', 'expert_0', 'expert_1']
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from search.demo.tiny import byte_tokenizer, tiny_config


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
                p.add_((torch.randn(p.shape, generator=gen) * delta).to(p.dtype))
        paths[f"expert_{i}"] = folder / f"expert_{i}"
        expert.save_pretrained(paths[f"expert_{i}"])
        tok.save_pretrained(paths[f"expert_{i}"])
    return paths


LORA_VARIANTS: dict[str, dict[str, Any]] = {
    # plain LoRA on attention and MLP, one rank override
    "lora": {"r": 4, "lora_alpha": 8, "rank_pattern": {"v_proj": 2},
             "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
    # DoRA with rsLoRA scaling
    "dora": {"r": 4, "lora_alpha": 4, "use_dora": True, "use_rslora": True,
             "target_modules": ["q_proj", "k_proj", "o_proj", "gate_proj"]},
    # LoRA on the embeddings, and a fully trained LM head (modules_to_save)
    "embed": {"r": 2, "lora_alpha": 2, "target_modules": ["embed_tokens", "v_proj"],
              "modules_to_save": ["lm_head"], "alpha_pattern": {"v_proj": 6}},
}


def save_lora_family(folder: str | Path, *, variants: tuple[str, ...] = tuple(LORA_VARIANTS),
                     seed: int = 0, scale: float = 0.05) -> dict[str, Path]:
    """A tiny Llama base, one full expert, and PEFT LoRA adapters of ``variants`` on the
    base with random factors, each also merged by PEFT into a full checkpoint
    (``<variant>_full``), so both forms of a parent can be compared. Needs ``peft``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    paths = save_family(folder, n_experts=1, arch="llama", seed=seed)
    gen = torch.Generator().manual_seed(seed + 7)
    for i, name in enumerate(variants):
        model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False,
                                                      **LORA_VARIANTS[name]))
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_" in pname and "magnitude" not in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * scale * (1 + i))
                elif "magnitude" in pname or "modules_to_save" in pname:
                    p.add_(torch.randn(p.shape, generator=gen) * scale)
        peft_model.peft_config["default"].base_model_name_or_path = str(paths["base"])
        paths[name] = folder / name
        peft_model.save_pretrained(str(paths[name]))
        paths[f"{name}_full"] = folder / f"{name}_full"
        merged: Any = peft_model.merge_and_unload()
        merged.save_pretrained(paths[f"{name}_full"])
        byte_tokenizer().save_pretrained(paths[f"{name}_full"])
    return paths

"""A model with known outputs: a tiny Llama that memorized answers, some wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evaluators.skills import load_split

N_DOCS = 16
WRONG = {1, 4, 6, 11, 15}  # doc ids whose memorized answer is wrong


def memorized_answer(doc_id: int, target: str) -> str:
    return target[::-1] + "9" if doc_id in WRONG else target


@pytest.fixture(scope="session")
def memorizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Saved model that answers soup_add val docs 0..15 (right, except ``WRONG``)."""
    from transformers import AutoModelForCausalLM

    from search.demo.tiny import byte_tokenizer, tiny_config

    torch.manual_seed(0)
    tok = byte_tokenizer()
    docs = load_split("add", "val")[:N_DOCS]
    texts = [d["prompt"] + memorized_answer(i, d["target"]) + "\n" for i, d in enumerate(docs)]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", hidden=64, layers=2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(400):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("memorizer") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def greedy_answers(model: torch.nn.Module, tok: object, prompts: list[str]) -> list[str]:
    """Direct computation: greedy decoding token by token until a newline."""
    answers = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids  # type: ignore[operator]
        out = ""
        with torch.no_grad():
            for _ in range(16):
                nxt = int(model(ids).logits[0, -1].argmax())
                piece = tok.decode([nxt])  # type: ignore[attr-defined]
                if "\n" in piece or nxt == tok.eos_token_id:  # type: ignore[attr-defined]
                    break
                out += piece
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        answers.append(out)
    return answers

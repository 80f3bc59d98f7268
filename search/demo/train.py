"""Training the demo models: a tiny Llama that learns the synthetic skills on a CPU.

Each example is ``prompt + target + "\\n"`` in the byte-level tokenizer; the loss covers
the target and the closing newline only (greedy generation stops at the newline). Batches
come from seeded streams (:func:`evaluators.skills.training_stream`, which never yields a
val or test prompt), so a :class:`TrainConfig` gives the same weights with one torch
thread per process; :func:`build_model` is the worker entry point.

Example:
    >>> cfg = TrainConfig(skills=("add",), steps=2, lr=1e-3, batch=4)
    >>> model, tok = new_model(seed=0), byte_tokenizer()
    >>> train(model, tok, cfg)["steps"]
    2
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from evaluators.skills import SKILLS, training_stream
from search.demo.tiny import byte_tokenizer, tiny_config

IGNORE = -100
MARKER = "demo_build.json"
Pair = tuple[str, str]


@dataclass(frozen=True)
class TrainConfig:
    """One training run: ``steps`` AdamW steps (the most, with ``stop_floor``) on batches
    of ``skills`` weighted by ``mix`` (default uniform), ``lr`` warmed up linearly for
    ``warmup`` steps, then cosine-decayed to ``lr * final_frac``. ``seed`` seeds the data
    streams only (the model's initialisation is seeded apart). ``replay`` is the expected
    fraction of each batch drawn from ``replay_skills`` instead; with ``distill``, those
    examples fit the starting model's predictions (KL on their target tokens), not their
    labels, so an expert keeps the base's behaviour on other skills rather than continuing
    the base's training. Every ``probe_every`` steps (with ``stop_floor`` or ``balance``) a
    probe set from the training stream is scored by greedy exact match: training stops once
    every skill has ``stop_floor``, and ``balance`` reweights the main stream toward the
    weaker skills (``mix_i * (1.05 - score_i)``) so no skill runs far ahead of the others.
    """

    skills: tuple[str, ...]
    steps: int
    lr: float
    mix: tuple[float, ...] | None = None
    batch: int = 64
    seed: int = 0
    replay: float = 0.0
    replay_skills: tuple[str, ...] = SKILLS
    distill: bool = False
    warmup: int = 20
    final_frac: float = 0.1
    stop_floor: float | None = None
    probe_every: int = 25
    balance: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (tuples become lists), for the build marker."""
        return json.loads(json.dumps(asdict(self)))


def new_model(*, seed: int, hidden: int = 64, layers: int = 2, arch: str = "llama",
              tie: bool = False) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, hidden=hidden, layers=layers,
                                                        tie=tie))


def encode(tokenizer: Any, pairs: Sequence[Pair]) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (target + newline)."""
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    targets = tokenizer([t + "\n" for _, t in pairs], add_special_tokens=False)["input_ids"]
    width = max(len(p) + len(t) for p, t in zip(prompts, targets, strict=True))
    inp = torch.full((len(pairs), width), tokenizer.pad_token_id, dtype=torch.long)
    lab, att = torch.full_like(inp, IGNORE), torch.zeros_like(inp)
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        n = len(p) + len(t)
        inp[i, :n] = torch.tensor(p + t)
        lab[i, len(p):n] = torch.tensor(t)
        att[i, :n] = 1
    return inp, att, lab


def batches(cfg: TrainConfig, mix: list[float]) -> Iterator[tuple[list[Pair], list[Pair]]]:
    """Endless seeded batches of ``(prompt, target)``, as (main stream, replay) parts;
    ``mix`` weighs the skills of the main stream (read at every draw)."""
    main = [training_stream((s,), cfg.seed + 31 * i) for i, s in enumerate(cfg.skills)]
    replay = training_stream(cfg.replay_skills, cfg.seed + 7919)
    rng = random.Random(cfg.seed + 104729)
    while True:
        n_replay = sum(rng.random() < cfg.replay for _ in range(cfg.batch))
        own = [next(rng.choices(main, weights=mix)[0]) for _ in range(cfg.batch - n_replay)]
        yield own, [next(replay) for _ in range(n_replay)]


def probe_items(skills: Sequence[str], seed: int, size: int = 100) -> dict[str, list[Pair]]:
    """``size`` distinct training-stream examples per skill (never val or test)."""
    out = {}
    for i, skill in enumerate(skills):
        items: dict[str, str] = {}
        stream = training_stream((skill,), seed + 65537 + i)
        while len(items) < size:
            items.setdefault(*next(stream))
        out[skill] = list(items.items())
    return out


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / span)))
    return cfg.lr * (cfg.final_frac + (1 - cfg.final_frac) * cos)


def _loss(model: Any, teacher: Any, batch: tuple[Tensor, Tensor, Tensor], n_own: int) -> Tensor:
    """Cross-entropy on the targets; with a teacher, KL to it on the replay rows."""
    inp, att, lab = batch
    logits = model(input_ids=inp, attention_mask=att).logits[:, :-1].float()
    lab = lab[:, 1:]
    if teacher is None or n_own == len(inp):
        return F.cross_entropy(logits.transpose(1, 2), lab, ignore_index=IGNORE)
    own = F.cross_entropy(logits[:n_own].transpose(1, 2), lab[:n_own], ignore_index=IGNORE,
                          reduction="sum")
    with torch.no_grad():
        ref = teacher(input_ids=inp[n_own:], attention_mask=att[n_own:]).logits[:, :-1]
    keep = lab[n_own:] != IGNORE
    kl = F.kl_div(logits[n_own:][keep].log_softmax(-1), ref[keep].float().log_softmax(-1),
                  log_target=True, reduction="sum")
    return (own + kl) / (lab != IGNORE).sum()


def train(model: Any, tokenizer: Any, cfg: TrainConfig) -> dict[str, Any]:
    """Trains ``model`` in place; returns steps taken, final loss, probe scores, seconds."""
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if cfg.distill else None
    probe = probe_items(cfg.skills, cfg.seed) if cfg.balance or cfg.stop_floor is not None else {}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.98))
    model.train()
    t0, recent, step, scores = time.perf_counter(), [0.0], 0, {}
    prior = list(cfg.mix or [1.0] * len(cfg.skills))
    mix = list(prior)
    for step, (own, replay) in zip(range(1, cfg.steps + 1), batches(cfg, mix), strict=False):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step - 1)
        loss = _loss(model, teacher, encode(tokenizer, own + replay), len(own))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = [*recent[-49:], loss.item()]
        if probe and step % cfg.probe_every == 0:
            scores = {s: greedy_exact_match(model, tokenizer, items) for s, items in probe.items()}
            if cfg.stop_floor is not None and min(scores.values()) >= cfg.stop_floor:
                break
            if cfg.balance:
                mix[:] = [m * (1.05 - scores[s]) for m, s in zip(prior, cfg.skills, strict=True)]
    model.eval()
    return {"steps": step, "loss": round(sum(recent) / len(recent), 5), "probe": scores,
            "seconds": round(time.perf_counter() - t0, 2)}


@torch.no_grad()
def greedy_exact_match(model: Any, tokenizer: Any, items: Sequence[Pair],
                       max_new: int = 16) -> float:
    """Exact match of greedy answers cut at the first newline, in one left-padded batch (a
    quick in-training probe; the same rule as the lm-eval tasks, without their setup cost)."""
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    was_training = model.training
    model.eval()
    rows = tokenizer([p for p, _ in items], add_special_tokens=False)["input_ids"]
    width = max(map(len, rows))
    inp = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    att = torch.arange(width) >= torch.tensor([width - len(r) for r in rows])[:, None]
    out = model.generate(input_ids=inp, attention_mask=att.long(), max_new_tokens=max_new,
                         do_sample=False, eos_token_id=newline,
                         pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return sum(t.split("\n")[0] == y for t, (_, y) in zip(texts, items, strict=True)) / len(items)


def is_complete(folder: Path, spec: dict[str, Any]) -> bool:
    """Whether ``folder`` holds a finished model or PEFT adapter built from ``spec``."""
    marker = folder / MARKER
    if not (marker.is_file() and any(folder.glob("*.safetensors"))
            and any((folder / c).is_file() for c in ("config.json", "adapter_config.json"))):
        return False
    try:
        return json.loads(marker.read_text()).get("spec") == json.loads(json.dumps(spec))
    except (OSError, ValueError):
        return False


def save_atomic(model: Any, tokenizer: Any, folder: Path, marker: dict[str, Any]) -> None:
    """Saves into a temporary sibling folder, writes the marker last, then renames."""
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def build_model(job: dict[str, Any]) -> dict[str, Any]:
    """Worker entry: trains the model ``job`` describes, saves it atomically, returns the
    training stats. ``job`` holds ``folder``, ``spec`` (kept in the marker), ``train`` (a
    :class:`TrainConfig`) and ``init`` (a folder to fine-tune) or ``model`` (arguments of
    :func:`new_model`); with ``lora`` (arguments of ``peft.LoraConfig``), a LoRA adapter is
    trained on ``init`` and saved alone, its config naming ``init`` as the base."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    tokenizer = byte_tokenizer()
    model: Any = (AutoModelForCausalLM.from_pretrained(job["init"], dtype=torch.float32)
                  if job.get("init") else new_model(**job["model"]))
    if job.get("lora"):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(job["train"].seed)  # LoRA's A factors are drawn at random
        model = get_peft_model(model, LoraConfig(**job["lora"]))
    stats = train(model, tokenizer, job["train"])
    save_atomic(model, tokenizer, Path(job["folder"]), {"spec": job["spec"], "stats": stats})
    return stats
